"""Train a DDPM: ``launch/train.py --config configs/NAME.yaml [key=value ...]``.

One process (CPU or one GPU, no launcher):
    python launch/train.py --config configs/digits.yaml
CPU, 2 processes (gloo):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29511 \\
        launch/train.py --config configs/digits.yaml
    (or, with no variable: accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/train.py ...)
1 GPU:
    accelerate launch --config_file configs/accelerate/1gpu.yaml launch/train.py --config configs/cifar10.yaml
1 node x 8 GPUs:
    accelerate launch --config_file configs/accelerate/8gpu.yaml launch/train.py --config configs/cifar10.yaml
2 nodes x 8 GPUs (run on each node, MACHINE_RANK 0 and 1, MASTER = node 0's address):
    accelerate launch --config_file configs/accelerate/2nodes.yaml --machine_rank $MACHINE_RANK \\
        --main_process_ip $MASTER --main_process_port 29500 launch/train.py --config configs/cifar10.yaml
DeepSpeed ZeRO-2 / ZeRO-3 (8 GPUs; ZeRO-1: deepspeed_zero1.yaml):
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml launch/train.py --config ...
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml launch/train.py --config ...
DeepSpeed on CPU (2 processes; no --cpu, no ACCELERATE_USE_CPU):
    DS_ACCELERATOR=cpu accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 --num_machines 1 \\
        --mixed_precision no --gradient_accumulation_steps 1 --main_process_port 29512 \\
        launch/train.py --config configs/digits.yaml
SLURM (multi-node, requeue on preemption):
    sbatch launch/slurm/train.sbatch configs/cifar10.yaml

The config's train.* keys are the truth for batch size, accumulation and mixed precision (the
launcher's --mixed_precision/--gradient_accumulation_steps are overridden; docs/training.md).
Exit codes as every command's (pipeline/cli.py): 0 finished (or already finished), 75 preempted after writing
a checkpoint (requeue: it resumes), 1 a failure (the traceback is printed), 2 an input to fix: an invalid
configuration, data that is missing, corrupt or of another geometry than the config sets, or a checkpoint that
does not fit or fails verification (one line, ``[rank R] error: ...``, says which).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline import cli, dist
from pipeline.config import load_config

if TYPE_CHECKING:
    from pipeline.train.hooks import LoopHooks


def main(argv: list[str] | None = None, hooks: LoopHooks | None = None) -> int:
    """The command line (``argv``, default sys.argv[1:]) to an exit code; ``hooks``: handed to the loop (the tests'
    tests/helpers/train_entry.py passes its fault injection; none here)."""

    p = cli.parser("launch/train.py", __doc__, full_description=True)
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="key=value overrides, e.g. train.total_steps=200 (every key: pipeline/config.py)")
    args = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        # Imported here, not at the top: --help and an invalid config answer before torch, accelerate and
        # DeepSpeed load (seconds on every rank).
        from pipeline.train.loop import train

        return train(cfg, hooks)

    def on_input_error(exc: cli.InputError) -> str:
        # Decided: this rank ends with 2. Every rank finds the same error, but the launcher SIGTERMs the
        # slower ones once the first has exited; ignoring it keeps their status 2 instead of -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return f"[rank {rank}] error: {exc}"

    code = cli.run("train", body, on_input_error=on_input_error)
    if code == cli.EXIT_INPUT:  # only an InputError gives it (train() returns 0 or 75)
        # Every rank stops here alike: tear the process groups down while the interpreter is whole. Left to
        # interpreter exit, gloo's teardown sometimes aborts a rank (SIGABRT) and its status 2 is lost.
        dist.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
