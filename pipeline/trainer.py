"""The training loop: ``train(cfg)`` in paragraphs (after NVlabs/edm's training_loop.py), with what a
step needs behind small objects: ``OptimizerStep`` (the DDP/DeepSpeed difference), ``TickStats`` (the
device-side statistics of a log tick), ``Preemption`` (SIGTERM/SIGUSR1) and ``FaultHooks`` (test-only).

``train(cfg) -> exit code``: 0 finished, 75 preempted (a checkpoint was written), raises otherwise
(launch/train.py maps ConfigError/CheckpointError to 2, anything else to 1).

Random streams (written down so that resume is bitwise and N ranks equal one rank):
- weights: ``torch.manual_seed(train.seed)`` before the U-Net is built, the same on every rank;
- t, noise and dropout of micro-batch m of optimizer step s: torch's global RNG (the CPU's and the
  device's generator, ``seed_generators``) reseeded with SeedSequence([train.seed, s, m]), where
  m = rank * accumulation + i counts micro-batches across
  ranks. The random numbers therefore depend on the position in the global batch only, not on the
  number of processes or on a restart;
- data order: the loader's own (data.seed, epoch), with its position saved per rank.

Host syncs and collectives: the loop never reads a device value except at a log tick (every
logging.every_steps), a sample grid or a checkpoint, and makes no collective of its own between ticks
(the preemption flags ride on the tick's all-reduce; DDP's gradient buckets and DeepSpeed's own
collectives and overflow check aside: tests/test_step_sync.py; with optimizer.grad_clip_per, GroupClip's one
all-reduce of the clipped gradients per step takes the buckets' place). A non-finite gradient is detected on
the device (``applied`` below) and the optimizer step is skipped on the device (fused Adam's found_inf,
the AMP mechanism), the EMA update is masked with the same flag, and counters are read at the next tick.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.config import Config, ConfigError, flatten, to_yaml
from pipeline.geometry import resolve_geometry

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written, requeue the job and it resumes


class NonFiniteLossError(RuntimeError):
    """Training stopped by train.nonfinite_policy."""


def classify_skip(ok: torch.Tensor, loss_sum: torch.Tensor, loss_scaling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-finite, loss-scaler skip) as 0/1 float tensors for one optimizer step, on the device (no sync).

    ``ok``: the step was applied. A skipped step is a loss-scaler skip when fp16 loss scaling is on and the
    loss was finite (the scaled gradient overflowed; the scaler lowers its scale and goes on); any other
    skipped step is non-finite and counts towards train.nonfinite_policy / max_nonfinite_in_row.
    """
    skipped = ~ok
    scaler_skip = skipped & torch.isfinite(loss_sum) if loss_scaling else torch.zeros_like(skipped)
    return (skipped & ~scaler_skip).float(), scaler_skip.float()


def lr_at(step: int, lr: float, warmup_steps: int, from_zero: bool = False) -> float:
    """The paper's schedule: linear warm-up over warmup_steps, then constant. ``step`` = steps done.

    ``from_zero`` (optimizer.warmup_from_zero): the authors' lr * min(step / warmup_steps, 1), so step 0 has lr 0
    (Adam's moments still take its gradient); else lr * min((step + 1) / warmup_steps, 1), full lr one step earlier.
    """
    return lr * min(1.0, (step if from_zero else step + 1) / warmup_steps) if warmup_steps else lr


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the global RNG for micro-batch ``micro`` (counted across ranks) of optimizer step ``step``."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0])


def seed_generators(seed: int, device: torch.device) -> None:
    """What ``torch.manual_seed(seed)`` does to the generators a step draws from (the CPU's and ``device``'s),
    without its cost: it also seeds every other backend, lazily, recording a stack trace each time."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def batch_split(batch_size: int, micro_batch_per_gpu: int, world_size: int) -> tuple[int, int]:
    """(micro batch per device, accumulation steps) for a global batch; raises ConfigError if indivisible."""
    micro = micro_batch_per_gpu or batch_size // world_size
    if micro == 0 or batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split over {world_size} processes with "
            f"train.micro_batch_per_gpu={micro_batch_per_gpu or 'auto'}: it must equal "
            f"micro_batch_per_gpu x {world_size} x accumulation steps; choose a batch size divisible by "
            f"{world_size * (micro_batch_per_gpu or 1)} or another micro_batch_per_gpu"
        )
    return micro, batch_size // (micro * world_size)


def git_commit() -> str:
    """HEAD of the checkout this code runs from ("" outside a git checkout): the run's source commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """Where training stands (the checkpoint's meta.json): steps, images, the MLflow run, finished."""

    def __init__(self) -> None:
        self.step, self.images_seen, self.finished = 0, 0, False
        self.mlflow_run_id: str | None = None
        self.mlflow_tracking_uri: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in vars(self):
            setattr(self, key, state.get(key))
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])


# -------------------------------------------------------------------------------------- optimizer step


class GroupClip:
    """optimizer.grad_clip_per: the authors' per-TPU-replica clipping, emulated exactly.

    The authors (tpu_utils.py, utils.make_optimizer) ran 8 replicas of 16 images: CrossShardOptimizer divides each
    replica's loss by 8, ``clip_by_global_norm(grad, grad_clip / 8)`` clips it, and the cross-replica sum adds
    them: the average of the 16-image gradients, each clipped to ``grad_clip`` on its own. Here each micro-batch is
    one group of grad_clip_per images: its backward runs without DDP's all-reduce (no_sync), ``add()`` clips its
    gradient (torch's clip_grad_norm_: global norm over all parameters) into a sum and empties ``.grad``, and
    ``finish()`` all-reduces the sum once per step (in place of DDP's buckets) and leaves
    sum_g clip(grad_g) / (groups per step, all ranks) in ``.grad``. No host sync.
    """

    def __init__(self, accelerator: Any, module: Any, grad_clip: float, groups: int):
        self.accelerator, self.grad_clip, self.groups = accelerator, grad_clip, groups
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.sums = [torch.zeros_like(p) for p in self.params]  # the parameters' dtype and memory format
        self.norm_sum = torch.zeros((), device=accelerator.device)
        self._step_open = False

    def add(self) -> None:
        """The gradient of the group just backpropagated, clipped to global norm grad_clip, into the step's sum."""
        if not self._step_open:  # the first group of a step: .grad of the last step were these sums
            torch._foreach_zero_(self.sums)
            self.norm_sum.zero_()
            self._step_open = True
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in have]
        with torch.no_grad():
            norm = torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.clip_grads_with_norm_([self.params[i] for i in have], self.grad_clip, norm)
            torch._foreach_add_([self.sums[i] for i in have], grads)
            self.norm_sum += norm
        for p in self.params:
            p.grad = None

    def finish(self) -> torch.Tensor:
        """Sum the groups of every rank (one all-reduce), leave their average in ``.grad``; returns the mean over
        the groups of their norms before clipping (train/grad_norm)."""
        if self.accelerator.num_processes > 1:
            flat = torch.cat([s.reshape(-1) for s in self.sums] + [self.norm_sum.reshape(1)])
            flat = self.accelerator.reduce(flat, reduction="sum")
            pieces = flat.split([s.numel() for s in self.sums] + [1])
            torch._foreach_copy_(self.sums, [v.view(s.shape) for v, s in zip(pieces, self.sums)])
            self.norm_sum.copy_(pieces[-1].reshape(()))
        torch._foreach_div_(self.sums, float(self.groups))
        for p, s in zip(self.params, self.sums):
            p.grad = s
        self._step_open = False
        return self.norm_sum / self.groups

    def average_norm(self) -> torch.Tensor:
        """Global norm of the averaged gradient (after ``finish()``); NaN or inf if any group's was not finite."""
        return torch.nn.utils.get_total_norm(self.sums)


def check_group_clip(cfg: Config, deepspeed: bool, world: int) -> None:
    """Refuse, before the first step, what optimizer.grad_clip_per does not support."""
    tc, per = cfg.train, cfg.optimizer.grad_clip_per
    fix = "or set optimizer.grad_clip_per=0 (clip the batch gradient once)"
    if deepspeed:
        raise ConfigError("optimizer.grad_clip_per is not supported under DeepSpeed, which clips the reduced "
                          f"gradient inside its own step: launch without DeepSpeed (DDP), {fix}")
    if tc.mixed_precision == "fp16":
        raise ConfigError("optimizer.grad_clip_per with train.mixed_precision=fp16 is not supported (each group's "
                          f"gradient would need unscaling first): use train.mixed_precision=no (the paper's) or bf16, {fix}")
    if tc.grad_comm_dtype != "fp32":
        raise ConfigError("optimizer.grad_clip_per all-reduces the clipped gradients itself, in fp32: set "
                          f"train.grad_comm_dtype=fp32, {fix}")
    if tc.micro_batch_per_gpu not in (0, per):
        raise ConfigError(f"optimizer.grad_clip_per={per} runs each group of {per} images as one micro-batch: set "
                          f"train.micro_batch_per_gpu=0 (or {per}), not {tc.micro_batch_per_gpu}, {fix}")
    if tc.batch_size % (per * world):
        raise ConfigError(f"optimizer.grad_clip_per={per}: train.batch_size={tc.batch_size} must be a multiple of "
                          f"{per} images x {world} processes = {per * world}; change either, {fix}")


class OptimizerStep:
    """Clip and step once per optimizer step: ``step(lr) -> (applied, grad_norm)``, device tensors, no sync.

    ``applied`` is the same on every rank (decided from the all-reduced gradient). DDP / one process: the
    global norm is clipped by accelerate and fused Adam skips the step on the device (found_inf) unless the
    update it would apply (clipped norm x lr) is finite. With ``group_clip`` (optimizer.grad_clip_per) the groups
    were clipped one by one: the step takes their average as it is, and ``grad_norm`` is the groups' mean norm.
    DeepSpeed stepped inside backward() and skipped a non-finite step itself (its own overflow check reads
    the norm on the host); its host counter skipped_steps tells us which, and its norm stays the device
    tensor it computed (read at the tick). The flags are two tensors made once: no host-to-device copy.
    """

    def __init__(self, accelerator: Any, module: Any, adam: torch.optim.Adam, wrapped: Any, grad_clip: float,
                 deepspeed: bool, group_clip: GroupClip | None = None):
        self.accelerator, self.module, self.adam, self.wrapped = accelerator, module, adam, wrapped
        self.grad_clip, self.deepspeed = grad_clip or math.inf, deepspeed
        self.group_clip = group_clip
        self._ds_skipped = module.skipped_steps if deepspeed else 0
        device = accelerator.device
        self._applied = torch.ones((), dtype=torch.bool, device=device), torch.zeros((), dtype=torch.bool,
                                                                                      device=device)
        self._zero = torch.zeros((), device=device)

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.adam.param_groups:  # DeepSpeed's optimizer shares these groups
            group["lr"] = lr
        device = self.accelerator.device
        if self.deepspeed:
            applied = self.module.skipped_steps == self._ds_skipped
            self._ds_skipped = self.module.skipped_steps
            norm = self.module.get_global_grad_norm() if applied else None
            if not torch.is_tensor(norm):  # skipped (DeepSpeed says inf; the tick ignores it) or not computed
                norm = self._zero if norm is None or not applied else torch.tensor(float(norm), device=device)
            return self._applied[0] if applied else self._applied[1], norm.detach().reshape(())
        if self.group_clip is not None:
            # The groups were clipped one by one: step with their average as it is (its norm <= grad_clip; a
            # second clip would rescale it by 1/(1 + 1e-6) at the bound), applied only if finite.
            group_norm = self.group_clip.finish()
            applied = torch.isfinite(self.group_clip.average_norm() * lr)
            self.adam.found_inf = (~applied).float()
            self.wrapped.step()
            self.wrapped.zero_grad(set_to_none=True)
            return applied, group_norm
        grad_norm = self.accelerator.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        # Decide on the update actually applied: the norm after clipping (the clip coefficient is NaN when the
        # norm or the bound is not finite) times the learning rate, so neither a NaN gradient nor a NaN/inf
        # setting reaches the weights.
        clip_coef = torch.clamp(self.grad_clip / (grad_norm + 1e-6), max=1.0)
        applied = torch.isfinite(grad_norm * clip_coef * lr)
        self.adam.found_inf = (~applied).float()
        self.wrapped.step()
        self.wrapped.zero_grad(set_to_none=True)
        return applied, grad_norm


def configure_deepspeed(accelerator: Any, cfg: Config, micro: int, accum: int) -> None:
    """We own batch sizes and clipping (global batch semantics); refuse settings that let NaNs through."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = cfg.train.batch_size
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    if cfg.train.grad_comm_dtype != "fp32":
        raise ConfigError(f"train.grad_comm_dtype={cfg.train.grad_comm_dtype} is for DDP; under DeepSpeed leave it "
                          "fp32 and set communication_data_type in the DeepSpeed JSON (configs/deepspeed/)")
    ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    # Under DeepSpeed, a non-finite step is skipped by the engine's own check; these settings turn it
    # off (ZeRO-1/2), and the NaN would reach the weights and the EMA unnoticed.
    disabled = [key for key, value in (("bf16.check_grad_overflow", ds.get("bf16", {}).get("check_grad_overflow")),
                                       ("zero_optimization.compute_grad_norm",
                                        ds["zero_optimization"].get("compute_grad_norm")))
                if str(value).lower() == "false"]
    if disabled:
        raise ConfigError(
            f"the DeepSpeed config sets {' and '.join(disabled)} to false: DeepSpeed would then apply steps with "
            "non-finite gradients, which train.nonfinite_policy relies on it to skip; remove "
            "those keys (both default to true)"
        )


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

    def flush(self, accelerator: Any, lr: float, batch_size: int, flag: bool = False
              ) -> tuple[dict[str, float], int, bool]:
        """(metrics of the tick, longest run of non-finite steps in it, ``flag`` on any rank). The losses and
        the host ``flag`` (the preemption signals) share one all-reduce, the loop's only collective of its own."""
        mine = torch.tensor([1.0 if flag else 0.0], device=self.device)
        stats = accelerator.reduce(torch.cat([self.loss_q, self.count_q, mine]), reduction="sum").tolist()
        loss_q, count_q, any_flag = stats[:4], stats[4:8], stats[8] > 0
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
        return metrics, longest, any_flag


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
            + (f"  non-finite {int(m['train/nonfinite_steps'])}" if m["train/nonfinite_steps"] else "")
            + (f"  loss-scaler skips {int(m['train/loss_scaler_skips'])}" if m.get("train/loss_scaler_skips") else ""))


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


# ---------------------------------------------------------------------------------------- fault hooks


class FaultHooks:
    """Test-only fault injection and tracing, read once from the environment; all off unless set.

    DDPM_FAULT_NAN_AT_STEP=3,4     the loss of those optimizer steps (1-based) is NaN on rank 0
    DDPM_FAULT_STALL_AFTER_STEP=N  once step N's checkpoint is written, stall as a hung job would (at most
                                   DDPM_FAULT_STALL_S seconds, default 600, then fail), so that a test can
                                   SIGKILL the run at a known step however fast the steps are
    DDPM_FAULT_NAN_WEIGHTS_AT_STEP=N  after optimizer step N, one weight becomes NaN on every rank (a corruption
                                   no skipped step explains), so that the checkpoint's own check is tested
    DDPM_TRACE_BATCHES_DIR=DIR     append "step micro sha1" of every consumed batch to DIR/rank-<r>.txt, and
                                   at the end "params sha1" / "ema sha1" of this rank's final weights
    DDPM_CUDA_SYNC_CHECK=1         any host-device sync inside a training step is an error, from the third
                                   step on (the first ones initialise CUDA, cuDNN and the allocator);
                                   GPU, DDP/1-GPU path only (tests/test_gpu.py)
    """

    def __init__(self, rank: int, on_gpu: bool, deepspeed: bool):
        raw = os.environ.get("DDPM_FAULT_NAN_AT_STEP", "")
        try:
            self.nan_steps = {int(s) for s in raw.split(",") if s.strip()} if rank == 0 else set()
            self.stall_after = int(os.environ.get("DDPM_FAULT_STALL_AFTER_STEP", "0") or 0)
            self.nan_weights_at = int(os.environ.get("DDPM_FAULT_NAN_WEIGHTS_AT_STEP", "0") or 0)
            self.stall_s = float(os.environ.get("DDPM_FAULT_STALL_S", "600"))
        except ValueError as exc:
            raise ConfigError(f"DDPM_FAULT_* environment variables must be numbers ({exc})") from exc
        trace_dir = os.environ.get("DDPM_TRACE_BATCHES_DIR", "")
        self.trace = open(Path(trace_dir) / f"rank-{rank}.txt", "a", buffering=1) if trace_dir else None  # noqa: SIM115
        self.sync_check = on_gpu and not deepspeed and os.environ.get("DDPM_CUDA_SYNC_CHECK", "") == "1"

    def batch(self, x: torch.Tensor, step: int, micro: int, first_of_rank: bool) -> torch.Tensor:
        if self.trace is not None:
            self.trace.write(f"{step} {micro} {hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()}\n")
        return x * float("nan") if first_of_rank and step + 1 in self.nan_steps else x

    @torch.no_grad()
    def after_step(self, step: int, ema: Any) -> None:
        if step == self.nan_weights_at:  # the live fp32 weights: the U-Net's, or this rank's DeepSpeed master slice
            first = ema.source_tensors()[0]
            first[(0,) * first.dim()] = float("nan")

    def step_window(self, enter: bool, step: int, first_step: int) -> None:
        if self.sync_check and step >= first_step + 2:
            torch.cuda.set_sync_debug_mode("error" if enter else "default")

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


# --------------------------------------------------------------------------------------------- train


def make_accelerator(tc: Any) -> tuple[Any, bool]:
    """(Accelerator, under DeepSpeed?). Refuses what cannot run before any process group exists."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DDPCommunicationHookType,
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
    )

    on_gpu = torch.cuda.is_available()
    if tc.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast and loss scaling are "
                          "GPU-only); on CPU use train.mixed_precision=bf16 or no")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    # gloo on CPU: DeepSpeed otherwise believes every rank is alone (docs/deepspeed.md).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a launcher started several processes
    handlers: list[Any] = [InitProcessGroupKwargs(backend="gloo")] if launched and not on_gpu else []
    # DDP: gradients are views into the all-reduce buckets (no second gradient-sized buffer and copy); the
    # reduction optionally in bf16 (DeepSpeed: communication_data_type, set in configure_deepspeed).
    # static_graph stays off: the accumulation steps skip the all-reduce (no_sync), which it does not promise.
    handlers.append(DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if tc.grad_comm_dtype == "bf16" else DDPCommunicationHookType.NO,
    ))
    # Several processes on CPU: cpu=True makes Accelerate's state MULTI_CPU whatever launched them. Without it,
    # a launch from a config file (use_cpu: true) without ACCELERATE_USE_CPU in the environment gave a process
    # group but distributed_type NO: no DDP wrapper (no gradient all-reduce) and no-op barriers.
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, kwargs_handlers=handlers,
                              cpu=launched and not on_gpu and not deepspeed)
    if launched and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"the launcher started {os.environ.get('WORLD_SIZE')} processes but Accelerate set up no "
                          "distributed run (distributed_type NO); launch with accelerate launch --multi_gpu, or "
                          "set ACCELERATE_USE_CPU=1 on a CPU machine")
    dist.init_flag_group()
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return accelerator, deepspeed


def start_tracking(cfg: Config, accelerator: Any, progress: Progress, resumed: bool) -> Any:
    """The tracking sink (a null sink off rank 0), with the resolved config as params and as a file.

    One run per training: a resume continues the checkpoint's run, or, when the checkpoint was saved before
    its run existed (run id null), the run that out_dir/mlflow_run.json names. A run named there that this
    job does not continue was left RUNNING by a job that died: the sink marks it KILLED.
    """
    from pipeline.tracking import describe_training_data, make_sink, read_run_file, source_tags

    logs = accelerator.is_main_process and cfg.tracking.enabled
    recorded = read_run_file(cfg.train.out_dir) if accelerator.is_main_process else None
    run_id = progress.mlflow_run_id or (recorded["run_id"] if recorded and resumed else None)
    sink = make_sink(cfg.tracking, out_dir=cfg.train.out_dir, is_main_process=accelerator.is_main_process,
                     run_id=run_id, run_name=cfg.tracking.run_name or cfg.name,
                     tags=source_tags(git_commit()) if logs else None,  # MLflow's mlflow.source.* / mlflow.user
                     supersedes=recorded["run_id"] if recorded and recorded["run_id"] != run_id else None)
    progress.mlflow_tracking_uri = getattr(sink, "tracking_uri", None)
    if logs:
        sink.log_params(flatten(cfg) | {"world_size": accelerator.num_processes,
                                        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
        sink.log_artifact(text=to_yaml(cfg), name="config.yaml")
        try:  # the loader has read the same manifest already; a failure here only costs the dataset input
            sink.log_dataset(describe_training_data(cfg.data), context="training")
        except Exception as exc:
            import logging

            logging.getLogger("pipeline.tracking").warning("tracking: the training data is not logged as a "
                                                           "dataset input: %s", exc)
    return sink


def uses_loss_scaling(accelerator: Any, tc: Any, deepspeed: bool) -> bool:
    """fp16 (GPU only): Accelerate's GradScaler, or DeepSpeed's dynamic loss scaler, skips a step whose scaled
    gradient overflowed and lowers the scale; with a finite loss that is the scaler at work, not a fault."""
    if tc.mixed_precision == "fp16":
        return True
    return deepspeed and str(accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled")
                             ).lower() == "true"


def nonfinite_stop(tc: Any, metrics: dict[str, float], longest: int, tick_steps: int, step: int) -> str:
    """Why train.nonfinite_policy stops the run after this tick ("" = go on)."""
    nonfinite = int(metrics["train/nonfinite_steps"])
    if not nonfinite or (tc.nonfinite_policy == "skip" and longest < tc.max_nonfinite_in_row):
        return ""
    why = ("train.nonfinite_policy=stop" if tc.nonfinite_policy == "stop" else
           f"{longest} in a row >= train.max_nonfinite_in_row={tc.max_nonfinite_in_row}")
    return (f"non-finite loss/gradient in {nonfinite} of the last {tick_steps} steps (ending at step {step}; "
            f"{why}); those steps were skipped, the weights and EMA are untouched: lower optimizer.lr, check the "
            "data, or use bf16/no.")


def already_finished(step: int, total_steps: int, checkpoint: Path) -> str:
    return (f"already finished at step {step} (train.total_steps={total_steps}; final checkpoint {checkpoint}): "
            "nothing to do. Raise train.total_steps to train on, or set name=NEW (or train.out_dir) for a new run")


def closing_summary(cfg: Config, *, steps: int, first_step: int, seconds: float, final: Path | None,
                    exit_code: int) -> str:
    """What the run did and what to do next (printed by rank 0 at the end)."""
    trained = steps - first_step
    rate = trained * cfg.train.batch_size / seconds if seconds > 0 else 0.0
    how = "finished" if exit_code == 0 else f"stopped (exit {exit_code}: requeue to resume)"
    lines = [f"{how}: {trained} steps this job (step {first_step} -> {steps} of {cfg.train.total_steps}) in "
             f"{duration(seconds)}, {rate:.1f} img/s overall"]
    if final is not None:
        lines.append(f"newest checkpoint: {final}")
        if exit_code == 0:
            lines.append(f"evaluate it: python -m evaluation.evaluate --checkpoint {final}")
    return "\n".join(lines)


def log_sample_grid(ema_net: torch.nn.Module, diffusion: Any, lg: Any, sink: Any, step: int) -> None:
    """A DDIM grid from the EMA into tracking (rank 0; a few seconds on the demo)."""
    from pipeline.images import image_grid
    from pipeline.sampling import sample

    device = next(ema_net.parameters()).device
    images = sample(ema_net, diffusion, range(lg.sample_grid_images), sampler="ddim", steps=lg.sample_ddim_steps,
                    batch_size=lg.sample_grid_images, device=device)
    sink.log_image(image_grid(images, min_width=256), key="samples/ema", step=step)


def log_real_grid(cfg: Config, sink: Any) -> None:
    """Real images of the training split, as many as the sample grids show, once per job ("samples/real"),
    so that the grids of samples are judged beside the data (rank 0; reads a few images)."""
    from pipeline.data.report import DataError
    from pipeline.data.sequential import iter_split
    from pipeline.images import image_grid

    try:
        images = [s.image for s in iter_split(cfg.data.shards, cfg.data.split, cfg.logging.sample_grid_images)]
    except DataError as exc:  # the loader reports the data's problems; the grid is only a picture
        print(f"warning: no real-image grid: {exc}", flush=True)
        return
    if images:
        sink.log_image(image_grid(np.stack(images), min_width=256), key="samples/real", step=0)


def init_from(net: torch.nn.Module, cfg: Config, accelerator: Any) -> None:
    """train.init_from: load that checkpoint's EMA weights into ``net`` (every rank, before the EMA copies it).

    A step folder, a run folder (its newest checkpoint whose EMA file matches its sha256) or an imported checkpoint
    (python -m evaluation.export --from-diffusers); its model config must be cfg.model's (model.dropout aside: it
    changes training, not what the weights mean). Skipped with a note when this run resumes from its own
    checkpoint; a resume of an imported checkpoint (no optimizer, data or RNG state) is refused.
    """
    import json

    from pipeline import checkpoint as ck
    from pipeline.config import to_dict
    from pipeline.interop import IMPORTED

    resume = cfg.checkpoint.resume
    own = ck.complete_checkpoints(cfg.train.out_dir) if resume == "auto" else [] if resume == "none" else [Path(resume)]
    if own:
        try:
            meta = json.loads((own[-1] / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}  # the resume says what is wrong with it
        if IMPORTED in meta:
            raise ck.CheckpointError(f"{own[-1]} is an imported checkpoint (weights only: no optimizer, data or RNG "
                                     "state) and cannot be resumed: start a new run (another train.out_dir) from it "
                                     f"with train.init_from={own[-1]}")
        if cfg.train.init_from:
            accelerator.print(f"train.init_from={cfg.train.init_from} ignored: resuming from this run's own checkpoint")
        return
    if not cfg.train.init_from:
        return
    where = Path(cfg.train.init_from)
    found = [where] if (where / ck.COMPLETE).exists() else list(reversed(ck.complete_checkpoints(where)))
    intact = [p for p in found if not ck.Checkpoint(p, what="train.init_from").verify([ck.EMA_FILE])]
    if not intact:
        raise ck.CheckpointError(f"train.init_from={where}: no complete checkpoint with an intact {ck.EMA_FILE} "
                                 "there; give a step-NNNNNNNN folder, a run folder holding one, or an imported checkpoint")
    weights, saved = ck.read_ema(intact[0] / ck.EMA_FILE)
    now = {k: v for k, v in to_dict(cfg.model).items() if k != "dropout"}
    diffs = [f"model.{k}: checkpoint {saved['model'].get(k)!r}, now {v!r}" for k, v in now.items()
             if saved["model"].get(k) != v]
    if diffs:
        raise ck.CheckpointError(f"train.init_from={intact[0]} holds weights of another network; differing keys: "
                                 f"{'; '.join(diffs)}. Set those keys to the checkpoint's (its config.yaml)")
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    accelerator.print(f"initialised the U-Net from the EMA weights of {intact[0]} (step {saved['step']}): new "
                      "optimizer, step 0")


def train(cfg: Config) -> int:
    from pipeline.checkpoint import CheckpointManager, PerRank, make_deepspeed_loads_weights_only
    from pipeline.data.loader import StreamingLoader
    from pipeline.diffusion import DDPMLoss, Diffusion
    from pipeline.ema import EMA, PartitionedEMA
    from pipeline.unet import UNet

    # Set-up: the geometry from the data (refusing a mismatch before anything is created), the accelerator
    # (refusing what cannot run), the batch split, test hooks.
    cfg = resolve_geometry(cfg)
    tc, oc = cfg.train, cfg.optimizer
    started = time.perf_counter()
    accelerator, deepspeed = make_accelerator(tc)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if oc.grad_clip_per:
        check_group_clip(cfg, deepspeed, world)
    micro, accum = batch_split(tc.batch_size, oc.grad_clip_per or tc.micro_batch_per_gpu, world)
    # With per-group clipping each micro-batch's gradient is taken whole (its loss not divided by accum): GroupClip
    # averages the clipped groups itself.
    accelerator.gradient_accumulation_steps = 1 if oc.grad_clip_per else accum
    faults = FaultHooks(rank, device.type == "cuda", deepspeed)

    # Model, loss, EMA, optimizer. The same seed on every rank gives the same initial weights (DDP would
    # broadcast them anyway; DeepSpeed does not). The EMA averages fp32 weights: under DDP an fp32 copy of
    # the live U-Net; under DeepSpeed (bf16 module, ZeRO partitions) each rank's slice of the optimizer's
    # fp32 master weights, so it is made once DeepSpeed has partitioned them (pipeline/ema.py).
    torch.manual_seed(tc.seed)
    net = UNet(cfg.model)
    init_from(net, cfg, accelerator)  # train.init_from, before the EMA copies the weights
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    diffusion = Diffusion(cfg.diffusion)
    ema: EMA | PartitionedEMA | None = None
    # all EMAs (ema.decay, ema.decays, ema.posthoc.sigma_rels) in one bank; snapshots at the checkpoint cadence
    # unless ema.posthoc.snapshot_every_steps says otherwise
    snapshot_every = cfg.ema.posthoc.snapshot_every_steps or cfg.checkpoint.every_steps
    if not deepspeed:
        net.to(device)
        ema = EMA(net, cfg.ema, device=device, snapshot_every=snapshot_every)
    if tc.compile:
        net.compile()  # in place: state_dict keys stay those of the plain U-Net
    adam = torch.optim.Adam(net.parameters(), lr=lr_at(0, oc.lr, oc.warmup_steps, oc.warmup_from_zero), betas=(oc.adam_beta1, oc.adam_beta2),
                            eps=oc.adam_eps, weight_decay=oc.weight_decay, fused=not deepspeed)
    if deepspeed:
        configure_deepspeed(accelerator, cfg, micro, accum)
    loss_module, wrapped_adam = accelerator.prepare(DDPMLoss(net, diffusion), adam)
    if deepspeed:
        make_deepspeed_loads_weights_only(loss_module)
        ema = PartitionedEMA(loss_module, net, cfg.ema, build=lambda: UNet(cfg.model), device=device,
                             snapshot_every=snapshot_every)
    group_clip = GroupClip(accelerator, loss_module, oc.grad_clip, accum * world) if oc.grad_clip_per else None
    optimizer_step = OptimizerStep(accelerator, loss_module, adam, wrapped_adam, oc.grad_clip, deepspeed, group_clip)
    autocast_bf16 = deepspeed and tc.mixed_precision == "bf16"  # DeepSpeed does not autocast for us
    loader = StreamingLoader(cfg.data, batch_size=micro, rank=rank, world_size=world)

    # Checkpoints and resume: every piece of state is one entry in the registry.
    progress = Progress()
    checkpoints = CheckpointManager(tc.out_dir, cfg.checkpoint, accelerator=accelerator, record=cfg,
                                    parts={"meta": progress, **ema.parts(), "data": PerRank(loader)},
                                    weights_finite=ema.all_finite)
    checkpoints.start()
    resumed_from = checkpoints.resume()
    if resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} at step {progress.step}")
        if progress.step >= tc.total_steps:  # nothing to train: no MLflow run, no loader, no new checkpoint
            accelerator.print(already_finished(progress.step, tc.total_steps, resumed_from))
            checkpoints.mark_done(progress.step)
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return 0

    # Tracking (rank 0; the sink never raises nor waits on the network), into the resumed run if any.
    sink = start_tracking(cfg, accelerator, progress, resumed=resumed_from is not None)
    if cfg.logging.sample_every_steps and accelerator.is_main_process and resumed_from is None:
        log_real_grid(cfg, sink)
    tick = TickStats(device, diffusion.num_timesteps, uses_loss_scaling(accelerator, tc, deepspeed))
    preemption = Preemption(cfg.preemption.check_every_steps)
    data_iter, exit_code, first_step = iter(loader), 0, progress.step
    accelerator.print(f"training: world {world}, micro batch {micro}, accumulation {accum}, "
                      + (f"each micro-batch's gradient clipped to {oc.grad_clip} (optimizer.grad_clip_per), "
                         if group_clip else "") + "from step "
                      f"{progress.step} to {tc.total_steps}")

    loss_module.train()  # once: nothing in the loop sets eval mode (sample grids run on the EMA network)
    while progress.step < tc.total_steps:
        step = progress.step
        faults.step_window(True, step, first_step)
        # Data: one micro-batch per accumulation step. The only wait on the loader is here.
        t0 = time.perf_counter()
        batches = [next(data_iter)["image"] for _ in range(accum)]
        data_wait_s = time.perf_counter() - t0

        # Forward and backward. accelerator.accumulate skips the DDP all-reduce (and DeepSpeed's step)
        # on all but the last micro-batch and divides the loss by the accumulation count. With per-group
        # clipping no backward all-reduces (no_sync): each group's gradient is clipped into GroupClip's sum.
        loss_q = count_q = torch.zeros(4, device=device)
        for i, x in enumerate(batches):
            m = rank * accum + i
            seed_generators(micro_seed(tc.seed, step, m), device)
            x = x.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = faults.batch(x, step, m, first_of_rank=i == 0)
            sync = accelerator.accumulate(loss_module) if group_clip is None else accelerator.no_sync(loss_module)
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16):
                loss_ps, t = loss_module(x)
                loss_ps = loss_ps.float()
                accelerator.backward(loss_ps.mean())
            if group_clip is not None:
                group_clip.add()
            lq, cq = tick.quartiles(loss_ps, t)
            loss_q, count_q = loss_q + lq, count_q + cq

        # Optimizer step, skipped on the device when the gradient is not finite; the EMA from fp32
        # weights, masked by the same flag so a skipped step leaves it unchanged.
        lr = lr_at(step, oc.lr, oc.warmup_steps, oc.warmup_from_zero)
        applied, grad_norm = optimizer_step.step(lr)
        tick.add(loss_q, count_q, applied, grad_norm, data_wait_s)
        ema.update(applied.float())
        faults.after_step(step + 1, ema)
        progress.step, progress.images_seen = step + 1, progress.images_seen + tc.batch_size
        step, done = progress.step, progress.step >= tc.total_steps
        faults.step_window(False, step - 1, first_step)  # what follows (ticks, grids, checkpoints) may sync

        # Log tick: the one place the host waits for the device; the ranks' preemption flags ride on its
        # all-reduce.
        signalled = False
        if step % cfg.logging.every_steps == 0 or done:
            tick_steps = tick.steps
            metrics, longest_nonfinite, signalled = tick.flush(accelerator, lr, tc.batch_size,
                                                               flag=preemption.pending)
            sink.log_metrics(metrics, step=step)
            accelerator.print(tick_line(step, tc.total_steps, metrics, time.perf_counter() - started))
            stop_why = nonfinite_stop(tc, metrics, longest_nonfinite, tick_steps, step)
            if stop_why:
                sink.finish("FAILED")
                raise NonFiniteLossError(f"{stop_why} {checkpoints.newest_intact_note()}")

        # Sample grid from the EMA (on rank 0; under DeepSpeed every rank takes part in gathering it).
        every = cfg.logging.sample_every_steps
        if every and (step % every == 0 or done):
            ema_net = ema.gathered_model()
            if accelerator.is_main_process:
                log_sample_grid(ema_net, diffusion, cfg.logging, sink, step)
            del ema_net

        # Preemption (decided from the tick's all-reduce) and checkpoint: every rank takes part in both.
        preempted = preemption.agreed(step, done, signalled)
        if checkpoints.due(step, final=done or preempted) or ema.snapshot_due(step):  # snapshots: in a checkpoint
            progress.finished, progress.mlflow_run_id = done, sink.run_id
            accelerator.print(f"checkpoint {checkpoints.save(step)}")
        faults.after_checkpoint(step, done)
        if preempted and not done:
            accelerator.print(f"preempted (signal {preemption.received[:1]}): checkpoint at step {step}, "
                              f"exiting with {PREEMPTED_EXIT_CODE}")
            exit_code = PREEMPTED_EXIT_CODE
            preemption.ignore_further()
            break

    # The end: digests for the tests, TRAINING_DONE, the run's status.
    faults.close(ema)
    if exit_code == 0:
        checkpoints.mark_done(progress.step)
    if loader.stats.get("skipped_samples") or loader.stats.get("skipped_shards"):
        accelerator.print(f"data: skipped {loader.stats}")
    sink.finish("FINISHED" if exit_code == 0 else "KILLED")
    newest = checkpoints.complete()
    accelerator.print(closing_summary(cfg, steps=progress.step, first_step=first_step,
                                      seconds=time.perf_counter() - started, final=newest[-1] if newest else None,
                                      exit_code=exit_code))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if exit_code == 0 and newest and accelerator.is_main_process and cfg.tracking.enabled and cfg.tracking.log_model:
        # The final EMA weights as an MLflow model of the run (docs/tracking.md); never fails the training.
        try:
            from evaluation.pyfunc_model import log_training_model
        except Exception as exc:
            print(f"warning: the EMA model was not logged to MLflow: {exc}", flush=True)
        else:
            log_training_model(newest[-1], cfg.tracking, sink.run_id, sink.tracking_uri)
    return exit_code
