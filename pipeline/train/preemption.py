"""Preemption: SIGTERM/SIGUSR1 set a flag; the ranks agree on it one step later, checkpoint and exit 75."""

from __future__ import annotations

import signal
from collections.abc import Callable

from pipeline import dist
from pipeline.cli import EXIT_PREEMPTED

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED  # 75, EX_TEMPFAIL: a checkpoint was written, requeue the job and it resumes


# ---------------------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel) only set a flag. After every ``check_every_steps``-th step each
    rank starts a non-blocking any-rank OR of its flag (``dist.start_any_true``: gloo, host only) and reads it after
    the next step: no step waits on it and no device syncs for it. When a rank saw a signal, every rank learns it
    at the same step and stops there: within ``check_every_steps + 1`` steps of the signal (2 by default), plus the
    checkpoint. One process needs no exchange: it stops at the first checked step after the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, check_every_steps: int):
        self.check_every_steps, self.received = check_every_steps, []
        self._in_flight: Callable[[], bool] | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, frame: self.received.append(signum))

    @property
    def pending(self) -> bool:
        """This rank got a signal (what it contributes to the exchange)."""
        return bool(self.received)

    def step_end(self, step: int, final: bool) -> bool:
        """Every rank, after each optimizer step (``step`` = steps done): stop here? The same answer on every rank.

        Reads the exchange started one step ago (if any), then starts the next one on the cadence. The last step
        reads the one in flight (every rank then has the same collectives behind it) and starts none.
        """
        stop = False
        if self._in_flight is not None:
            stop, self._in_flight = self._in_flight(), None
        if stop or final or step % self.check_every_steps:
            return stop and not final
        if not dist.is_initialized():
            return self.pending
        self._in_flight = dist.start_any_true(self.pending)
        return False

    def ignore_further(self) -> None:
        # The checkpoint is written. torchrun SIGTERMs the other workers as soon as one exits non-zero;
        # Python restores SIG_DFL for its handlers during interpreter shutdown, so that SIGTERM turned a
        # slower rank's exit 75 into a death by signal (-15). An ignored signal stays ignored through
        # shutdown; this is set before the last barrier, so on every rank before any rank exits.
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
