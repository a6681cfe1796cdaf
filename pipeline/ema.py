"""EMA of the U-Net weights: ema-pytorch's EMA, updated without a host sync and never from a skipped step.

ema-pytorch keeps the EMA copy and gives the decay warm-up (decay = 1 - (1 + n)^-power, capped at
``beta``). Two things are ours:

- ``update(ok)`` takes a 0-d device tensor ``ok`` (1 = the optimizer step was applied, 0 = it was
  skipped because the gradients were not finite) and multiplies the lerp weight by it, so a skipped
  step leaves the EMA bit-for-bit unchanged without the host having to look at ``ok``.
- The step counter ema-pytorch reads with ``.item()`` lives on the CPU (we never move this module,
  only its ``ema_model``), so reading it costs no device sync.

The EMA always reads fp32 weights. Under plain DDP (with or without bf16 autocast) that is the live
U-Net. Under DeepSpeed (bf16 module, or ZeRO-3 partitions) the caller passes a ``source`` fp32 copy
that ``refresh_source_from_deepspeed`` fills from DeepSpeed's fp32 master weights before each update.
"""

from __future__ import annotations

from typing import Any

import torch
from ema_pytorch import EMA as _LucidrainsEMA
from torch import nn

from pipeline.config import EMAConfig


class _MaskedEMA(_LucidrainsEMA):
    """ema-pytorch's EMA whose lerp weight is multiplied by a device tensor ``ok`` set before update()."""

    _ok: torch.Tensor | None = None

    def get_current_decay(self):  # the lerp weight ema-pytorch uses is 1 - this
        decay = super().get_current_decay()  # host float (the step buffer is on the CPU)
        if self._ok is None:
            return decay
        # lerp weight = 1 - decay_returned = (1 - decay) * ok
        return 1.0 - (1.0 - decay) * self._ok


class EMA:
    """An fp32 EMA of ``source``; identical on every rank because every rank sees the same weights."""

    def __init__(self, source: nn.Module, cfg: EMAConfig):
        self.source = source
        self.inner = _MaskedEMA(
            source,
            beta=cfg.decay,
            update_after_step=cfg.warmup_steps,
            update_every=cfg.update_every,
            power=cfg.power,
            include_online_model=False,
            use_foreach=True,
        )
        self.inner.ema_model.float().requires_grad_(False)

    @property
    def model(self) -> nn.Module:
        """The EMA network (eval mode when sampling is the caller's business)."""
        return self.inner.ema_model

    @property
    def num_updates(self) -> int:
        return int(self.inner.step)

    def update(self, ok: torch.Tensor | None = None) -> None:
        """One EMA step after one optimizer step; ``ok`` (0-d float tensor on the weights' device) masks it.

        While ema-pytorch is still in its copy phase (step <= warmup_steps), a skipped optimizer step
        left the weights unchanged, so copying them again changes nothing either.
        """
        self.inner._ok = ok
        try:
            self.inner.update()
        finally:
            self.inner._ok = None

    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA U-Net's state_dict in fp32 on the CPU (what ema.safetensors holds)."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.inner.ema_model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything the EMA is: its weights (fp32, CPU) and ema-pytorch's warm-up counters."""
        return {"weights": self.weights(), "num_updates": int(self.inner.step), "initted": bool(self.inner.initted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.ema_model.load_state_dict(state["weights"])
        self.inner.step.fill_(int(state["num_updates"]))
        self.inner.initted.fill_(bool(state["initted"]))


@torch.no_grad()
def refresh_source_from_deepspeed(source: nn.Module, live: nn.Module) -> None:
    """Copy DeepSpeed's full fp32 master weights of ``live`` into ``source`` (same parameter order).

    ``safe_get_full_fp32_param`` is a collective under ZeRO (it gathers partitions): every rank must
    call this, in the same order. Under ZeRO-1/2 without bf16 the module already holds full fp32
    weights and this still returns them.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for dst, p in zip(source.parameters(), live.parameters(), strict=True):
        full = safe_get_full_fp32_param(p)
        if full is None:  # not (yet) managed by a ZeRO optimizer: the module tensor is the weight
            full = p.data
        dst.copy_(full.reshape(dst.shape).to(dst.device, torch.float32))
