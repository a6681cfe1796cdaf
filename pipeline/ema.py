"""EMA of the U-Net weights: ema-pytorch's schedule, updated with no host sync and never from a skipped step.

The schedule is ema-pytorch's (0.8), kept to the bit: after n updates the decay is
``min(decay, 1 - (1 + n - warmup_steps - 1)^-power)`` (0 before that), the first update and every update
up to ``warmup_steps`` copy the weights, and only every ``update_every``-th update averages. What differs
from calling ema-pytorch is how an update runs:

- ``update(ok)`` takes a 0-d device tensor ``ok`` (1 = the optimizer step was applied, 0 = it was skipped
  because the gradients were not finite). The lerp weight is ``ok * w`` on the device, so a skipped step
  leaves the EMA bit-for-bit unchanged and the host never reads ``ok``. (ema-pytorch's ``_foreach_lerp_``
  takes the weight as a host number: a device tensor there is an ``.item()``, a sync per step.)
- The counters are host integers and ``w`` is computed on the host with torch's CPU kernels, exactly as
  ema-pytorch computes it (its rounding included), so the weights equal ema-pytorch's bit for bit
  (tests/test_ema.py); the tensors to average are listed once, not found by walking the modules each step.

Two layouts:

- ``EMA`` (one process, DDP): an fp32 copy of the U-Net, averaged from the live fp32 U-Net with one
  ``torch._foreach_lerp_`` (a tensor weight: on CUDA that is torch's per-tensor path, one small kernel per
  tensor, still launched from C++ in one call).
- ``PartitionedEMA`` (DeepSpeed ZeRO-1/2/3): each rank averages the fp32 master partition its ZeRO optimizer
  owns (``pipeline.ema_deepspeed.ZeroLayout``), one ``lerp_`` per parameter group and no collective; no rank
  holds a full copy. The full EMA is gathered (one collective per group) only for checkpoints, sample grids
  and the end, and only global rank 0 materialises it.

Both save the same state: ``{"weights": fp32 U-Net state_dict on the CPU, "num_updates": int,
"initted": bool}`` (``ema.safetensors``), so checkpoints move between the two and older ones resume.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline import dist
from pipeline.config import EMAConfig


class EMASchedule:
    """ema-pytorch's counters and decay warm-up on the host: what the next update does, and its lerp weight."""

    def __init__(self, cfg: EMAConfig):
        self.beta, self.update_after_step, self.update_every, self.power = (cfg.decay, cfg.warmup_steps,
                                                                             cfg.update_every, cfg.power)
        self.num_updates, self.initted = 0, False
        self._capped: float | None = None  # the weight once the decay has reached its cap (it stays there)

    def next(self) -> tuple[str, float]:
        """Advance one update: ("copy" | "lerp" | "none", lerp weight of an applied step).

        As ema-pytorch's ``EMA.update``: the first call copies; then every ``update_every``-th call copies
        while the count is at most ``warmup_steps``, averages after that. The copy is not masked (a skipped
        step left the weights as they were, and ema-pytorch copies them regardless).
        """
        step = self.num_updates
        self.num_updates += 1
        if not self.initted:
            self.initted = True
            return "copy", 1.0
        if step % self.update_every:
            return "none", 0.0
        if step <= self.update_after_step:
            return "copy", 1.0
        if self.beta == 1.0:  # ema-pytorch's is_frozen
            return "none", 0.0
        return "lerp", self.weight(self.num_updates)

    def weight(self, num_updates: int) -> float:
        """The lerp weight after ``num_updates`` updates: ``1 - (1 - (1 - decay) * ok)`` at ok = 1, in float32.

        The same torch ops on the same dtypes as ema-pytorch's ``get_current_decay`` (int64 counter, float32
        decay) and as the mask multiplied into it before, on CPU tensors read through numpy: no device and
        no ``_local_scalar_dense``. Once the decay reaches ``beta`` it stays there and is not recomputed.
        """
        if self._capped is not None:
            return self._capped
        epoch = (torch.tensor(num_updates, device="cpu") - self.update_after_step - 1).clamp(min=0.0)
        if num_updates - self.update_after_step - 1 <= 0:
            decay = 0.0
        else:
            value = 1 - (1 + epoch / 1.0) ** -self.power  # inv_gamma = 1
            decay = float(value.clamp(min=0.0, max=self.beta).numpy())
        one = torch.ones((), dtype=torch.float32, device="cpu")
        w = float((1.0 - (1.0 - (1.0 - decay) * one)).numpy())
        if decay == float(torch.tensor(self.beta, dtype=torch.float32).numpy()):
            self._capped = w
        return w

    def state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "initted": self.initted}

    def load(self, state: dict[str, Any]) -> None:
        self.num_updates, self.initted = int(state["num_updates"]), bool(state["initted"])


def _float_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The floating parameters and buffers ema-pytorch averages, in its order (parameters, then buffers)."""
    return ([p for p in module.parameters() if p.is_floating_point()]
            + [b for b in module.buffers() if b.is_floating_point()])


def _finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN/inf in any of the tensors (one host sync: checkpoints only)."""
    tensors = [t for t in tensors if t.numel()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()) if tensors else True


class EMA:
    """An fp32 EMA of ``source`` (the live U-Net); identical on every rank because every rank sees the same
    weights. ``device``: where the EMA lives (the source's device)."""

    def __init__(self, source: nn.Module, cfg: EMAConfig, device: torch.device | str | None = None):
        self.source = source
        self.model = copy.deepcopy(source).float().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.schedule = EMASchedule(cfg)
        self._lists: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def num_updates(self) -> int:
        return self.schedule.num_updates

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Listed at the first update, when the source has reached its device (moving a module replaces its
        # buffers); both modules are only updated in place after that.
        if self._lists is None:
            dst, src = _float_tensors(self.model), _float_tensors(self.source)
            if [t.shape for t in dst] != [t.shape for t in src]:
                raise ValueError("the EMA copy and the live U-Net no longer have the same tensors")
            self._lists = [t.detach() for t in dst], [t.detach() for t in src]
        return self._lists

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None) -> None:
        """One EMA step after one optimizer step; ``ok`` (0-d float tensor on the weights' device) masks it."""
        what, w = self.schedule.next()
        if what == "none":
            return
        dst, src = self._tensors()
        if what == "copy":
            torch._foreach_copy_(dst, src)
        elif ok is None:
            torch._foreach_lerp_(dst, src, w)
        else:
            weight = ok.to(torch.float32) * w  # 0 or w, exactly: a skipped step moves nothing
            torch._foreach_lerp_(dst, src, [weight] * len(dst))

    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA U-Net's state_dict in fp32 on the CPU (what ema.safetensors holds)."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}

    # the same interface as PartitionedEMA: nothing to gather, every rank has everything
    def gather_weights(self, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        return self.weights()

    def gather_source(self, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The live weights' state_dict (what the EMA averages)."""
        return self.source.state_dict()

    def gathered_model(self) -> nn.Module:
        """The EMA network (no collective here; its train/eval mode is the caller's business)."""
        return self.model

    def source_tensors(self) -> list[torch.Tensor]:
        """The live weights the EMA reads (a test hook poisons one)."""
        return list(self.source.parameters())

    def all_finite(self) -> bool:
        """Live weights and EMA free of NaN/inf (the same answer on every rank: they hold the same weights)."""
        return _finite(_float_tensors(self.source)) and _finite(_float_tensors(self.model))

    def prepare_state_dict(self) -> None:
        """Nothing to gather (CheckpointManager calls this on every rank before rank 0 saves)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the EMA is: its weights (fp32, CPU) and ema-pytorch's warm-up counters."""
        return {"weights": self.weights(), **self.schedule.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.schedule.load(state)


class PartitionedEMA:
    """The EMA of DeepSpeed's fp32 master weights, partitioned like them: rank r averages the slice its ZeRO
    optimizer owns. ``build()`` makes a U-Net (for the gathered EMA network on rank 0, sampled on ``device``)."""

    def __init__(self, engine: Any, net: nn.Module, cfg: EMAConfig, build: Callable[[], nn.Module],
                 device: torch.device | str | None = None):
        from pipeline.ema_deepspeed import ZeroLayout

        self.layout = ZeroLayout(engine, net)
        self.build, self.device = build, device
        self.schedule = EMASchedule(cfg)
        self.flats = [m.detach().float().clone() for m in self.layout.masters]  # the EMA's partitions
        self._gathered: dict[str, torch.Tensor] | None = None

    @property
    def num_updates(self) -> int:
        return self.schedule.num_updates

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None) -> None:
        """One EMA step on this rank's partitions; no collective, no host sync."""
        what, w = self.schedule.next()
        if what == "none":
            return
        weight = w if ok is None else ok.to(torch.float32) * w
        for ema, master in zip(self.flats, self.layout.masters, strict=True):
            if what == "copy":
                ema.copy_(master)
            else:  # (ZeRO-Offload keeps the master weights on the CPU: there the flag is copied over, a sync)
                ema.lerp_(master.float(), weight.to(ema.device) if torch.is_tensor(weight) else weight)

    def gather_weights(self, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """The full EMA (U-Net state_dict, fp32, CPU) on global rank 0 (every rank with ``everywhere``); None
        elsewhere. A collective: every rank calls it."""
        return self.layout.gather(self.flats, everywhere=everywhere)

    def gather_source(self, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """DeepSpeed's full fp32 master weights, as gather_weights."""
        return self.layout.gather(self.layout.masters, everywhere=everywhere)

    def gathered_model(self) -> nn.Module | None:
        """The EMA network on global rank 0 (built for the occasion, on ``device``), None elsewhere. A
        collective: every rank calls it."""
        weights = self.gather_weights()
        if weights is None:
            return None
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the global RNG alone
            net = self.build()
        net.load_state_dict(weights)
        return net.to(self.device or self.flats[0].device).requires_grad_(False)

    def source_tensors(self) -> list[torch.Tensor]:
        """The weights in this rank's fp32 master partitions, per parameter (a test hook poisons one)."""
        return self.layout.real(self.layout.masters)

    def all_finite(self) -> bool:
        """Master weights and EMA free of NaN/inf on every rank: each checks its partitions, then all agree (a
        host all-reduce: every rank calls this, at checkpoints)."""
        mine = _finite(self.layout.real(self.layout.masters)) and _finite(self.layout.real(self.flats))
        return not dist.any_true(not mine)

    def prepare_state_dict(self) -> None:
        """Gather the full EMA to rank 0 (every rank, before rank 0 calls state_dict)."""
        self._gathered = self.gather_weights()

    def state_dict(self) -> dict[str, Any]:
        """As EMA.state_dict, on global rank 0 after prepare_state_dict()."""
        weights, self._gathered = self._gathered, None
        if weights is None:
            if dist.world_size() > 1:
                raise RuntimeError("PartitionedEMA.state_dict() needs prepare_state_dict() on every rank first")
            weights = self.gather_weights()
        return {"weights": weights, **self.schedule.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each rank takes its slices of the full EMA (no collective)."""
        self.layout.scatter(state["weights"], self.flats)
        self.schedule.load(state)
