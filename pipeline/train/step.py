"""What one optimizer step needs besides the forward and backward: the learning rate (``lr_at``), the seeds of
the step's random streams (``micro_seed``, ``seed_generators``), the batch split, and ``OptimizerStep`` (clip and
step: the DDP/DeepSpeed difference, no host sync), ``GroupClip`` (optimizer.grad_clip_per) and the DeepSpeed
settings we own."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ConfigError


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


def micro_seed(seed: int, step: int, micro: int, *domain: int) -> int:
    """Seed of the global RNG for micro-batch ``micro`` (counted across ranks) of optimizer step ``step`` (with a
    ``domain``: of another stream, e.g. StepNoise's block ``micro``)."""
    return int(np.random.SeedSequence([seed, step, micro, *domain]).generate_state(1, dtype=np.uint64)[0])


NOISE_BLOCK = 8  # positions of a step whose t and noise one generator draws (train.seed, step, block)


class StepNoise:
    """The timesteps and noise of each position of an optimizer step's global batch, whoever draws them.

    Position q of step s (q = (accumulation step * world size + rank) * micro batch + i, the sample's place in
    the step's global batch: pipeline.data.plan) gets its t and noise from block q // NOISE_BLOCK, drawn by a
    generator seeded with (train.seed, s, block). A rank draws the blocks its micro-batch overlaps and keeps its
    slice, so 1 process and N processes give each sample the same t and noise (counter-based per block: at most
    NOISE_BLOCK - 1 extra rows per end of a micro-batch, and one generator seeding per block)."""

    def __init__(self, seed: int, num_timesteps: int, device: torch.device):
        self.seed, self.T, self.device = seed, num_timesteps, device
        self.gen = torch.Generator(device=device)

    def draw(self, step: int, q0: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t int64 (n,), noise float32 shape) for positions q0 .. q0 + n - 1 of step ``step`` (n = shape[0])."""
        n = shape[0]
        first, last = q0 // NOISE_BLOCK, (q0 + n - 1) // NOISE_BLOCK
        ts, noises = [], []
        for block in range(first, last + 1):
            self.gen.manual_seed(micro_seed(self.seed, step, block, 0x7E))
            ts.append(torch.randint(0, self.T, (NOISE_BLOCK,), generator=self.gen, device=self.device))
            noises.append(torch.randn((NOISE_BLOCK, *shape[1:]), generator=self.gen, device=self.device))
        lo = q0 - first * NOISE_BLOCK
        t, noise = (torch.cat(ts), torch.cat(noises)) if len(ts) > 1 else (ts[0], noises[0])
        return t[lo:lo + n], noise[lo:lo + n]


# ONEDNN_MAX_CPU_ISA values that leave out oneDNN's bf16 kernels (its ISA names, oldest first)
_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_bf16_units(cpuinfo: str | None = None, max_isa: str | None = None) -> bool:
    """Whether bf16 autocast on this CPU runs on bf16 units: an x86 CPU with AVX512_BF16 or AMX (the ``flags``
    of Linux's /proc/cpuinfo), unless ONEDNN_MAX_CPU_ISA caps oneDNN below them. Elsewhere oneDNN emulates bf16
    and a training step is slower than in fp32 (benchmarks/cpu_bf16.py: 0.51x with AVX-512 but no
    bf16 units, 0.06x with AVX2). Unknown (no /proc/cpuinfo: macOS, Windows) counts as no."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa
    if max_isa.strip().upper() in _ISAS_WITHOUT_BF16:
        return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(cfg: Config, on_gpu: bool | None = None) -> tuple[Config, str]:
    """``cfg`` with train.mixed_precision=auto decided for this machine (bf16 where the device computes it
    natively, else no), and a line saying what was decided and why ("" when nothing was decided). An explicit
    bf16 on a CPU without bf16 units stays, with a warning line: it runs, slowly."""
    tc = cfg.train
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if tc.mixed_precision == "bf16" and not on_gpu and not cpu_has_bf16_units():
        return cfg, ("warning: train.mixed_precision=bf16 on a CPU without bf16 units (AVX512_BF16 or AMX): oneDNN "
                     "emulates bf16, 2 to 16 times slower than float32 (measured); train.mixed_precision=no (or auto) is "
                     "faster")
    if tc.mixed_precision != "auto":
        return cfg, ""
    if on_gpu:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        why = f"{torch.cuda.get_device_name()} {'has' if native else 'has no'} bf16 tensor cores"
    else:
        native = cpu_has_bf16_units()
        why = f"this CPU {'has' if native else 'has no'} bf16 units (AVX512_BF16 or AMX)"
    chosen = "bf16" if native else "no"
    line = f"train.mixed_precision=auto: {chosen} ({why})"
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, mixed_precision=chosen)), line


def apply_numerics(tc: Any) -> dict[str, Any]:
    """train.tf32 and train.cudnn_benchmark as torch's backend flags (process-wide; they matter on CUDA only).
    Returns what was set. cuDNN's autotuner is off under train.deterministic (it may pick another algorithm)."""
    precision = "tf32" if tc.tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 (the legacy flags must not be mixed in)
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tc.tf32)
    torch.backends.cudnn.benchmark = bool(tc.cudnn_benchmark and not tc.deterministic)
    return {"tf32": bool(tc.tf32), "cudnn_benchmark": torch.backends.cudnn.benchmark}


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
