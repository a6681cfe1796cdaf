"""Preemption: SIGTERM/SIGUSR1 set a flag; the ranks agree on it at a log tick and the loop checkpoints and exits 75."""

from __future__ import annotations

import signal

from pipeline.cli import EXIT_PREEMPTED

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED  # 75, EX_TEMPFAIL: a checkpoint was written, requeue the job and it resumes


# ---------------------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel) only set a flag. The flags ride on the log tick's all-reduce
    (``TickStats.flush``), so agreeing adds no collective; the ranks act at a tick whose step is a multiple of
    ``preemption.check_every_steps`` (or the last step): within lcm(logging.every_steps, check_every_steps)
    steps of the signal. Then the loop checkpoints and exits 75."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, check_every_steps: int):
        self.check_every_steps, self.received = check_every_steps, []
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, frame: self.received.append(signum))

    @property
    def pending(self) -> bool:
        """This rank got a signal (what it contributes to the tick's all-reduce)."""
        return bool(self.received)

    def agreed(self, step: int, final: bool, any_rank: bool) -> bool:
        """Stop here? ``any_rank``: some rank had a signal, from this step's tick (False off ticks): the same
        value on every rank, so every rank decides alike. No collective."""
        return (step % self.check_every_steps == 0 or final) and any_rank

    def ignore_further(self) -> None:
        # The checkpoint is written. torchrun SIGTERMs the other workers as soon as one exits non-zero;
        # Python restores SIG_DFL for its handlers during interpreter shutdown, so that SIGTERM turned a
        # slower rank's exit 75 into a death by signal (-15). An ignored signal stays ignored through
        # shutdown; this is set before the last barrier, so on every rank before any rank exits.
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
