"""The DDPM U-Net (Ho et al. 2020, Appendix B; the authors' diffusion_tf/models/unet.py).

A PixelCNN++/Wide-ResNet style U-Net: per resolution level ``num_res_blocks`` residual blocks
(GroupNorm(32) → swish → 3×3 conv, plus a projection of the time embedding, → GroupNorm → swish → dropout
→ 3×3 conv), self-attention blocks at the resolutions in ``attn_resolutions``, a middle block
(res → attention → res), and a mirrored upsampling path with ``num_res_blocks + 1`` blocks per level that
concatenate the skip activations. Downsampling is a stride-2 3×3 conv with TensorFlow's "SAME" padding
(pad right/bottom only), upsampling nearest ×2 then 3×3 conv. Time enters as the Transformer sinusoidal
embedding followed by two dense layers (width 4·base). Weights are initialised as the authors did
(variance scaling, fan_avg, uniform; the last conv of each residual branch and the output conv ≈ 0).

Pure torch (docs/architecture.md): no accelerate, torch.distributed or mlflow imports.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig

# name -> ModelConfig fields. Parameter counts: cifar10 35,746,307; lsun256/celebahq256 113,673,219 (3 channels).
PRESETS: dict[str, dict] = {
    # The paper's CIFAR-10 network (run_cifar.py, model "unet2d16b2"): 35.7M parameters.
    "cifar10": dict(
        image_size=32, channels=3, base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.1, num_heads=1,
    ),
    # The 256x256 networks (run_lsun.py / run_celebahq.py, model "unet2d16b2c112244"): 113.7M parameters.
    "lsun256": dict(
        image_size=256, channels=3, base_channels=128, channel_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.0, num_heads=1,
    ),
    "celebahq256": dict(
        image_size=256, channels=3, base_channels=128, channel_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.0, num_heads=1,
    ),
    # Not from the paper: 8x8 grey digits (scikit-learn's load_digits) that train on 2 CPU cores in minutes.
    # Other sizes: leave attn_resolutions unset for the rule in pipeline.config.default_attention.
    "digits": dict(
        image_size=8, channels=1, base_channels=32, channel_mult=[1, 2], num_res_blocks=2,
        attn_resolutions=[4], dropout=0.1, num_heads=1,
    ),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, with field overrides (e.g. ``channels=1``)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown U-Net preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise KeyError(f"unknown ModelConfig field(s) {bad}; the fields are {sorted(fields)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer sinusoidal embedding of integer timesteps, [sin | cos], as in the authors' code."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    # TF variance_scaling(scale, "fan_avg", "uniform") == xavier_uniform with gain sqrt(scale); zero bias.
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)  # TF group_norm's epsilon


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The authors' "nin_shortcut": a 1x1 projection when the width changes.
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _init(self.conv1)
        _init(self.temb_proj)
        _init(self.conv2, scale=1e-10)
        if isinstance(self.shortcut, nn.Conv2d):
            _init(self.shortcut)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions, through scaled_dot_product_attention (fused kernels)."""

    def __init__(self, ch: int, num_heads: int) -> None:
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the {ch} channels of an attention block")
        self.num_heads = num_heads
        self.norm = _norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj_out = nn.Linear(ch, ch)
        # The authors' q, k, v are three separate NIN layers: initialise each C x C chunk on its own fans.
        for chunk in self.qkv.weight.data.chunk(3, dim=0):
            nn.init.xavier_uniform_(chunk)
        nn.init.zeros_(self.qkv.bias)
        _init(self.proj_out, scale=1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C / heads), the authors' 1/sqrt(C) at 1 head
        h = self.proj_out(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)
        _init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" with stride 2: all padding right/bottom


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        _init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """``UNet(cfg.model)``; ``forward(x (B, C, H, W), t (B,) int64) -> (B, C, H, W)`` (ε or x_0)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.resolved:
            raise ValueError("UNet needs model.image_size and model.channels: set them, or resolve them from the data "
                             "first (pipeline.geometry.resolve_geometry)")
        self.cfg = cfg
        self.image_size = S = int(cfg.image_size)
        self.in_channels = int(cfg.channels)
        ch = int(cfg.base_channels)
        mult = list(cfg.channel_mult)
        attn = set(cfg.attn_resolutions)
        temb_ch = 4 * ch
        self.base_channels = ch

        self.temb_dense0 = nn.Linear(ch, temb_ch)
        self.temb_dense1 = nn.Linear(temb_ch, temb_ch)
        _init(self.temb_dense0)
        _init(self.temb_dense1)
        self.conv_in = nn.Conv2d(cfg.channels, ch, 3, padding=1)
        _init(self.conv_in)

        # Downsampling path; skip_ch records the width of every activation pushed onto the skip stack.
        self.down = nn.ModuleList()
        skip_ch = [ch]
        cur, res = ch, S
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleDict({"res": ResBlock(cur, ch * m, temb_ch, cfg.dropout)})
                cur = ch * m
                if res in attn:
                    block["attn"] = AttnBlock(cur, cfg.num_heads)
                self.down.append(block)
                skip_ch.append(cur)
            if level != len(mult) - 1:
                self.down.append(nn.ModuleDict({"down": Downsample(cur)}))
                res //= 2
                skip_ch.append(cur)

        self.mid_res1 = ResBlock(cur, cur, temb_ch, cfg.dropout)
        self.mid_attn = AttnBlock(cur, cfg.num_heads)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, cfg.dropout)

        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleDict({"res": ResBlock(cur + skip_ch.pop(), ch * m, temb_ch, cfg.dropout)})
                cur = ch * m
                if res in attn:
                    block["attn"] = AttnBlock(cur, cfg.num_heads)
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleDict({"up": Upsample(cur)}))
                res *= 2
        assert not skip_ch and res == S

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, cfg.channels, 3, padding=1)
        _init(self.conv_out, scale=1e-10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if (self.in_channels, self.image_size, self.image_size) != (C, H, W):
            raise ValueError(
                f"UNet built for ({self.in_channels}, {self.image_size}, {self.image_size}) inputs "
                f"(model.channels, model.image_size) got x of shape {tuple(x.shape)}"
            )
        if t.shape != (B,) or t.dtype.is_floating_point:
            raise ValueError(f"t must be integer timesteps of shape ({B},), got {tuple(t.shape)} {t.dtype}")
        temb = timestep_embedding(t, self.base_channels).to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))

        hs = [self.conv_in(x)]
        for block in self.down:
            if "down" in block:
                hs.append(block["down"](hs[-1]))
                continue
            h = block["res"](hs[-1], temb)
            if "attn" in block:
                h = block["attn"](h)
            hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], temb)), temb)

        for block in self.up:
            if "up" in block:
                h = block["up"](h)
                continue
            h = block["res"](torch.cat([h, hs.pop()], dim=1), temb)
            if "attn" in block:
                h = block["attn"](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
