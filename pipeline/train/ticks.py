"""The statistics of a log tick, kept on the device (``TickStats``: one host sync per tick) and the tick's line."""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.train.step import classify_skip

# ------------------------------------------------------------------------------------ tick statistics


class TickStats:
    """Sums over one log tick, kept on the device; ``flush()`` is the one host sync and resets them."""

    def __init__(self, device: torch.device, num_timesteps: int, loss_scaling: bool):
        self.device, self.T, self.loss_scaling = device, num_timesteps, loss_scaling
        z = torch.zeros((), device=device)
        self.loss_q, self.count_q = torch.zeros(4, device=device), torch.zeros(4, device=device)  # by t-quartile
        self.grad_norm, self.applied, self.nonfinite, self.scaler_skips = z.clone(), z.clone(), z.clone(), z.clone()
        self.nonfinite_run = z.clone()  # non-finite steps in a row, now
        self.nonfinite_run_max = z.clone()  # the longest such run since the last flush
        self.steps, self.data_wait_s, self.start = 0, 0.0, time.perf_counter()

    def quartiles(self, loss_ps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses summed by t-quartile, and their counts."""
        q = (t * 4 // self.T).clamp(max=3)
        return (torch.zeros(4, device=self.device).index_add_(0, q, loss_ps.detach()),
                torch.zeros(4, device=self.device).index_add_(0, q, torch.ones_like(loss_ps)))

    def add(self, loss_q: torch.Tensor, count_q: torch.Tensor, applied: torch.Tensor, grad_norm: torch.Tensor,
            data_wait_s: float) -> None:
        """One optimizer step. A skipped step's loss stays out of the curve, as its update stays out of the
        weights; it counts as non-finite unless fp16's loss scaler skipped a step whose loss was finite."""
        nonfinite, scaler_skip = classify_skip(applied, loss_q.sum(), self.loss_scaling)
        zero = torch.zeros((), device=self.device)
        self.loss_q += torch.where(applied, loss_q, zero)
        self.count_q += torch.where(applied, count_q, zero)
        self.grad_norm += torch.where(applied, grad_norm.float(), zero)
        self.applied += applied.float()
        self.nonfinite += nonfinite
        self.scaler_skips += scaler_skip
        self.nonfinite_run = (self.nonfinite_run + 1) * nonfinite
        self.nonfinite_run_max = torch.maximum(self.nonfinite_run_max, self.nonfinite_run)
        self.steps += 1
        self.data_wait_s += data_wait_s

    def flush(self, accelerator: Any, lr: float, batch_size: int) -> tuple[dict[str, float], int]:
        """(metrics of the tick, longest run of non-finite steps in it). One all-reduce of the loss quartiles, the
        loop's only collective between steps besides the preemption flags' (``Preemption.step_end``)."""
        stats = accelerator.reduce(torch.cat([self.loss_q, self.count_q]), reduction="sum").tolist()
        loss_q, count_q = stats[:4], stats[4:8]
        applied, nonfinite, scaler_skips = self.applied.item(), self.nonfinite.item(), self.scaler_skips.item()
        longest = int(self.nonfinite_run_max.item())
        elapsed = time.perf_counter() - self.start
        metrics = {
            "train/loss": sum(loss_q) / max(sum(count_q), 1.0),
            **{f"train/loss_q{j + 1}": loss_q[j] / count_q[j] for j in range(4) if count_q[j]},
            "train/lr": lr,
            "train/grad_norm": self.grad_norm.item() / max(applied, 1.0),
            "train/images_per_s": self.steps * batch_size / elapsed,
            "train/step_time_s": elapsed / self.steps,
            "train/data_wait_s": self.data_wait_s / self.steps,
            "train/nonfinite_steps": nonfinite,
            **({"train/loss_scaler_skips": scaler_skips} if self.loss_scaling else {}),
        }
        for v in (self.loss_q, self.count_q, self.grad_norm, self.applied, self.nonfinite, self.scaler_skips):
            v.zero_()
        self.nonfinite_run_max.copy_(self.nonfinite_run)
        self.steps, self.data_wait_s, self.start = 0, 0.0, time.perf_counter()
        return metrics, longest


def duration(seconds: float) -> str:
    """``1:02:03`` (h:mm:ss) for log lines."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def tick_line(step: int, total_steps: int, metrics: dict[str, float], elapsed_s: float) -> str:
    """One log line per tick; the ETA assumes the remaining steps run at this tick's step time."""
    m = metrics
    eta = (total_steps - step) * m["train/step_time_s"]
    return (f"step {step}/{total_steps}  loss {m['train/loss']:.4f}  lr {m['train/lr']:.2e}  "
            f"{m['train/images_per_s']:.1f} img/s  data {m['train/data_wait_s'] * 1e3:.0f} ms/step  "
            f"elapsed {duration(elapsed_s)}  eta {duration(eta)}"
            + (f"  {m['train/tflops_per_device']:.3g} TFLOP/s/device" if "train/tflops_per_device" in m else "")
            + (f"  MFU {m['train/mfu']:.1%}" if "train/mfu" in m else "")
            + (f"  non-finite {int(m['train/nonfinite_steps'])}" if m["train/nonfinite_steps"] else "")
            + (f"  loss-scaler skips {int(m['train/loss_scaler_skips'])}" if m.get("train/loss_scaler_skips") else ""))
