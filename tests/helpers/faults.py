"""Fault injection and tracing for the trainer tests: ``EnvFaultHooks``, the training loop's hooks
(pipeline/train/hooks.py) driven by environment variables, so that a test sets them on a real launch of
tests/helpers/train_entry.py (``h.train_cmd``). All off unless set; read once, when the loop starts.

DDPM_FAULT_NAN_AT_STEP=3,4     the loss of those optimizer steps (1-based) is NaN on rank 0 (its first
                               micro-batch is multiplied by NaN)
DDPM_FAULT_STALL_AFTER_STEP=N  once step N's checkpoint is written, stall as a hung job would (at most
                               DDPM_FAULT_STALL_S seconds, default 600, then fail), so that a test can
                               SIGKILL the run at a known step however fast the steps are
DDPM_FAULT_STEP_SLEEP_S=X      every optimizer step takes X seconds longer (a slow model or allocation)
DDPM_FAULT_NAN_WEIGHTS_AT_STEP=N  after optimizer step N, one weight becomes NaN on every rank (a corruption
                               no skipped step explains), so that the checkpoint's own check is tested
DDPM_TRACE_BATCHES_DIR=DIR     append "step micro sha1" of every consumed batch to DIR/rank-<r>.txt, and
                               at the end "params sha1" / "ema sha1" of this rank's final weights
DDPM_TRACE_INDICES_DIR=DIR     append "step micro i,j,..." (the samples' split indices) of every consumed batch
                               to DIR/rank-<r>.idx
DDPM_CUDA_SYNC_CHECK=1         any host-device sync inside a training step is an error, from the third
                               step of the job on (the first ones initialise CUDA, cuDNN and the allocator);
                               GPU, DDP/1-GPU path only (tests/test_gpu.py)

A DDPM_FAULT_* value that is not a number is a ConfigError (the run exits 2).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from pipeline.config import ConfigError
from pipeline.train.hooks import LoopHooks


class EnvFaultHooks(LoopHooks):
    """The DDPM_* variables above, as loop hooks; every rank builds one (``start`` reads the environment)."""

    def __init__(self) -> None:
        self.nan_steps: set[int] = set()
        self.stall_after = self.nan_weights_at = 0
        self.stall_s = 600.0
        self.step_sleep_s = 0.0
        self.trace: TextIO | None = None
        self.indices: TextIO | None = None
        self.sync_check = False

    def start(self, *, rank: int, device: torch.device, deepspeed: bool) -> None:
        raw = os.environ.get("DDPM_FAULT_NAN_AT_STEP", "")
        try:
            self.nan_steps = {int(s) for s in raw.split(",") if s.strip()} if rank == 0 else set()
            self.stall_after = int(os.environ.get("DDPM_FAULT_STALL_AFTER_STEP", "0") or 0)
            self.nan_weights_at = int(os.environ.get("DDPM_FAULT_NAN_WEIGHTS_AT_STEP", "0") or 0)
            self.stall_s = float(os.environ.get("DDPM_FAULT_STALL_S", "600"))
            self.step_sleep_s = float(os.environ.get("DDPM_FAULT_STEP_SLEEP_S", "0") or 0)
        except ValueError as exc:
            raise ConfigError(f"DDPM_FAULT_* environment variables must be numbers ({exc})") from exc
        trace_dir = os.environ.get("DDPM_TRACE_BATCHES_DIR", "")
        self.trace = open(Path(trace_dir) / f"rank-{rank}.txt", "a", buffering=1) if trace_dir else None  # noqa: SIM115
        index_dir = os.environ.get("DDPM_TRACE_INDICES_DIR", "")
        self.indices = open(Path(index_dir) / f"rank-{rank}.idx", "a", buffering=1) if index_dir else None  # noqa: SIM115
        self.sync_check = (device.type == "cuda" and not deepspeed
                           and os.environ.get("DDPM_CUDA_SYNC_CHECK", "") == "1")

    def step_begin(self, step: int, first_step: int) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        self._sync_window(True, step, first_step)

    def samples(self, step: int, micro: int, index: torch.Tensor) -> None:
        if self.indices is not None:
            self.indices.write(f"{step} {micro} {','.join(map(str, index.tolist()))}\n")

    def batch(self, x: torch.Tensor, step: int, micro: int, first_of_rank: bool) -> torch.Tensor:
        if self.trace is not None:
            self.trace.write(f"{step} {micro} {hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()}\n")
        return x * float("nan") if first_of_rank and step + 1 in self.nan_steps else x

    def step_end(self, steps_done: int, first_step: int, ema: Any) -> None:
        if steps_done == self.nan_weights_at:
            self._nan_weight(ema)
        self._sync_window(False, steps_done - 1, first_step)  # what follows (ticks, grids, checkpoints) may sync

    def after_checkpoint(self, step: int, final: bool) -> None:
        if step == self.stall_after and not final:
            print(f"fault injection: stalling after step {step}", flush=True)
            time.sleep(self.stall_s)
            raise RuntimeError(f"DDPM_FAULT_STALL_AFTER_STEP: nobody killed the run within {self.stall_s:.0f} s")

    def close(self, ema: Any) -> None:
        """Every rank (under DeepSpeed the full weights are gathered to every rank: a collective)."""
        if self.trace is None:
            return
        params, averaged = ema.gather_source(everywhere=True), ema.gather_weights(everywhere=True)
        for name, sd in (("params", params), ("ema", averaged)):  # tests compare these across ranks and runs
            blob = b"".join(v.detach().float().cpu().numpy().tobytes() for _, v in sorted(sd.items()))
            self.trace.write(f"{name} {hashlib.sha1(blob).hexdigest()}\n")
        self.trace.close()

    @staticmethod
    @torch.no_grad()
    def _nan_weight(ema: Any) -> None:
        first = ema.source_tensors()[0]  # the live fp32 weights: the U-Net's, or this rank's DeepSpeed master slice
        first[(0,) * first.dim()] = float("nan")

    def _sync_window(self, enter: bool, step: int, first_step: int) -> None:
        if self.sync_check and step >= first_step + 2:
            torch.cuda.set_sync_debug_mode("error" if enter else "default")
