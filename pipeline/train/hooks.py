"""Where the training loop lets an observer in: ``LoopHooks``, whose methods all do nothing.

``train(cfg, hooks=...)`` takes one; production code never passes one. The tests subclass it to inject faults
(a NaN loss, NaN weights, a stall after a checkpoint), to trace the batches and final weights of every rank
(tests/helpers/faults.py) and to watch for host syncs inside a step (tests/helpers/step_probe.py); the benchmarks
to time steps. A hook runs on every rank, inside the loop: it must not sync the host with the device unless that
is what it is for.
"""

from __future__ import annotations

from typing import Any

import torch


class LoopHooks:
    """The loop's extension points, in the order it calls them; each does nothing here."""

    def start(self, *, rank: int, device: torch.device, deepspeed: bool) -> None:
        """Once, at set-up: the accelerator exists, the model does not yet (an error raised here, e.g. a
        ConfigError, ends the run before anything is built or written). Where this rank runs."""

    def step_begin(self, step: int, first_step: int) -> None:
        """Before optimizer step ``step`` (0-based: steps done so far) waits for its data; ``first_step``: where
        this job started."""

    def samples(self, step: int, micro: int, index: torch.Tensor) -> None:
        """The split indices (pipeline.data: batch["index"]) of micro-batch ``micro`` of step ``step``, on the host."""

    def batch(self, x: torch.Tensor, step: int, micro: int, first_of_rank: bool) -> torch.Tensor:
        """Micro-batch ``micro`` (counted across ranks) of step ``step``, on the device; returns what trains."""
        return x

    def step_end(self, steps_done: int, first_step: int, ema: Any) -> None:
        """After the optimizer step and the EMA update (``steps_done`` = step + 1), before the tick, the sample
        grid and the checkpoint: the end of the window that ``step_begin`` opened."""

    def after_checkpoint(self, step: int, final: bool) -> None:
        """After the checkpoint decision of ``step`` (a checkpoint may or may not have been written; ``final``:
        the last step), before a preemption exit."""

    def close(self, ema: Any) -> None:
        """At the end of the loop (finished or preempted; not when it raised), every rank (under DeepSpeed,
        gathering weights here is a collective)."""
