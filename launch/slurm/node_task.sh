#!/bin/bash
# The per-node task of train.sbatch (one srun task per node): runs `accelerate launch` for this node
# and passes preemption signals on to the training processes.
#
#   srun ... bash launch/slurm/node_task.sh ACCELERATE_LAUNCH_ARGS... launch/train.py --config ...
#
# Why a wrapper: torchrun (inside `accelerate launch`) starts each training process in a session of
# its own, so a signal SLURM sends to the task's process group (proctrack/pgid) never reaches them;
# and torchrun's agent dies of SIGUSR1 and answers SIGTERM by killing its workers 30 s later, which
# can cut a checkpoint short. So the launcher runs with USR1 and TERM ignored (the training processes
# inherit that and install their own handlers), and this wrapper sends USR1/TERM to the launcher's
# children, the training processes, which agree on a step, checkpoint and exit 75. SLURM's final
# SIGKILL (KillWait after TERM) still ends everything.

set -uo pipefail

# Python keeps an inherited SIG_IGN unless told otherwise; torchrun is told not to handle TERM
# (PET_SIGNALS_TO_HANDLE is the default of its --signals_to_handle; older torch reads the other name).
(trap '' USR1 TERM
 export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
 exec accelerate launch --machine_rank "$SLURM_NODEID" "$@") &
launcher=$!

# shellcheck disable=SC2317  # called by the traps
forward() {  # $1: the signal
    local children pid
    # The launcher's direct children (every thread's) are the training processes.
    children=$(cat /proc/"$launcher"/task/*/children 2>/dev/null) || true
    echo "node_task (node ${SLURM_NODEID}): SIG$1 -> training processes ${children:-(none yet)}" >&2
    for pid in $children; do
        kill -s "$1" "$pid" 2>/dev/null || true
    done
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early whenever a trapped signal arrives; wait again until the launcher has ended.
while :; do
    wait "$launcher"
    rc=$?
    kill -0 "$launcher" 2>/dev/null || break
done
exit "$rc"
