"""Our U-Net and schedule <-> diffusers' ``UNet2DModel`` and ``DDPMScheduler``: configs and weights, exactly.

Pure functions on config dataclasses, config dicts and state dicts; diffusers itself is not imported here
(evaluation/export.py builds its classes from what these functions return). Our U-Net is the authors'
architecture, which diffusers expresses with ``DownBlock2D``/``AttnDownBlock2D`` and
``UpBlock2D``/``AttnUpBlock2D`` blocks (the layout of the released ``google/ddpm-*`` models): tensor for
tensor the same weights, except that our attention's fused ``qkv`` projection is diffusers' ``to_q``,
``to_k`` and ``to_v`` stacked along the output dimension. Both directions check every key and shape, and a
layout or schedule one side cannot represent is refused (``InteropError``) rather than converted into
something that computes differently.

    unet_config = diffusers_unet_config(cfg.model)            # UNet2DModel(**unet_config)
    theirs = to_diffusers(ema_state_dict, cfg.model)           # UNet2DModel.load_state_dict(theirs)
    model_cfg = model_config_from_diffusers(unet.config)       # and back
    ours = from_diffusers(unet.state_dict(), model_cfg)        # bitwise the tensors we started from
    scheduler_config(cfg.diffusion) / diffusion_config_from_scheduler(scheduler.config)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.cli import InputError
from pipeline.config import ConfigError, DiffusionConfig, ModelConfig
from pipeline.model.unet import UNet

# How diffusers names the parts of a residual block and of an attention block (ours -> theirs).
_RES_PARTS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2"}
_QKV = ("to_q", "to_k", "to_v")

# UNet2DModel settings our U-Net has one fixed answer to (the authors' choices); anything else is refused.
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "flip_sin_to_cos": (False,),  # [sin | cos], as the authors' embedding
    "freq_shift": (1,),  # frequencies exp(-ln(10^4) i / (half - 1))
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (0,),  # TF "SAME" with stride 2: pad right/bottom only
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),  # the same function in diffusers' get_activation
    "norm_num_groups": (32,),
    "attn_norm_num_groups": (None, 32),
    "norm_eps": (1e-6,),  # TF group_norm's epsilon
    "resnet_time_scale_shift": ("default",),  # the time embedding is added, not a scale/shift
    "add_attention": (True,),  # the middle block attends
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # improved DDPM's cosine, clipped at 0.999
_VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
IMPORTED = "imported_from"  # meta.json key of a checkpoint imported from diffusers (weights only: never resumed)


class InteropError(ValueError, InputError):
    """A model or schedule the other side cannot represent exactly; the message says what differs and what to do."""


# ------------------------------------------------------------------------------------------- U-Net config


def _levels(cfg: ModelConfig) -> tuple[list[int], list[bool]]:
    """(resolution of each level, whether it attends)."""
    if not cfg.resolved:
        raise InteropError("the model config has no image_size/channels; use the resolved config a checkpoint "
                           "records (its config.yaml or ema.safetensors)")
    res = [int(cfg.image_size) // 2**i for i in range(len(cfg.channel_mult))]
    attn = set(cfg.attn_resolutions or [])
    return res, [r in attn for r in res]


def _head_dim(cfg: ModelConfig) -> int | None:
    """diffusers' ``attention_head_dim`` for our ``num_heads``: one head per block is ``None``; several heads
    need one head width for every attention block, since diffusers sets heads = width // attention_head_dim."""
    if cfg.num_heads == 1:
        return None
    _, attends = _levels(cfg)
    widths = {cfg.base_channels * cfg.channel_mult[-1]} | {
        cfg.base_channels * m for m, a in zip(cfg.channel_mult, attends) if a
    }
    if len(widths) > 1:
        raise InteropError(
            f"model.num_heads={cfg.num_heads} with attention blocks of widths {sorted(widths)}: diffusers' UNet2DModel "
            "has one attention_head_dim for all of them, so their head counts would differ from ours "
            f"({cfg.num_heads} each); this model cannot be expressed in diffusers' layout"
        )
    return widths.pop() // cfg.num_heads


def diffusers_unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """``UNet2DModel(**this)`` is our U-Net of ``cfg`` (the ``google/ddpm-*`` layout); InteropError if impossible."""
    res, attends = _levels(cfg)
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]  # up block k runs at level n-1-k
    config: dict[str, Any] = {
        "sample_size": int(cfg.image_size),
        "in_channels": int(cfg.channels),
        "out_channels": int(cfg.channels),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": _head_dim(cfg),
        "dropout": float(cfg.dropout),
    }
    config.update({key: allowed[0] for key, allowed in _FIXED.items()})
    return config


def _same(value: Any, allowed: tuple[Any, ...]) -> bool:
    """JSON config values against ours: booleans, strings and None exactly, numbers to float rounding."""
    for a in allowed:
        if a is None or isinstance(a, (bool, str)):
            if value is a or (type(value) is type(a) and value == a):
                return True
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(value, a, rel_tol=1e-9):
            return True
    return False


def model_config_from_diffusers(config: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig for a ``UNet2DModel`` config (all of its keys, defaults filled in); InteropError naming every
    setting our U-Net does not have."""
    problems = [f"{key}={config.get(key)!r} (ours: {' or '.join(map(repr, allowed))})"
                for key, allowed in _FIXED.items() if not _same(config.get(key), allowed)]
    down, up = list(config.get("down_block_types") or []), list(config.get("up_block_types") or [])
    widths = [int(w) for w in config.get("block_out_channels") or []]
    known_down, known_up = {"DownBlock2D", "AttnDownBlock2D"}, {"UpBlock2D", "AttnUpBlock2D"}
    if set(down) - known_down or set(up) - known_up:
        problems.append(f"block types {sorted((set(down) - known_down) | (set(up) - known_up))} (ours: "
                        "DownBlock2D/AttnDownBlock2D, UpBlock2D/AttnUpBlock2D)")
    if not (len(down) == len(up) == len(widths) >= 1):
        problems.append(f"{len(down)} down blocks, {len(up)} up blocks, {len(widths)} block_out_channels (ours: "
                        "the same number of each)")
    else:
        down_attn = [t == "AttnDownBlock2D" for t in down]
        up_attn = [t == "AttnUpBlock2D" for t in reversed(up)]
        if down_attn != up_attn and isinstance(config.get("sample_size"), (int, list, tuple)):
            side = config["sample_size"] if isinstance(config["sample_size"], int) else config["sample_size"][0]
            going = [f"{side // 2**i}x{side // 2**i}" for i, a in enumerate(down_attn) if a]
            coming = [f"{side // 2**i}x{side // 2**i}" for i, a in enumerate(up_attn) if a]
            problems.append(
                f"attention at {going or 'no resolution'} going down but at {coming or 'no resolution'} coming up "
                f"(up_block_types={up}; ours attends at the same resolutions on both paths: up block k runs at the "
                f"resolution of down block {len(up) - 1}-k)"
            )
    if config.get("in_channels") != config.get("out_channels"):
        problems.append(f"in_channels={config.get('in_channels')} != out_channels={config.get('out_channels')}")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        problems += [] if len(size) == 2 and size[0] == size[1] else [f"sample_size={list(size)} (ours: square)"]
        size = size[0]
    if widths and any(w % widths[0] for w in widths):
        problems.append(f"block_out_channels={widths} (ours: multiples of the first)")
    temb = config.get("time_embedding_dim")
    if widths and temb not in (None, 4 * widths[0]):
        problems.append(f"time_embedding_dim={temb} (ours: 4 x block_out_channels[0] = {4 * widths[0]})")
    if problems:
        raise InteropError("this UNet2DModel is not the DDPM layout our U-Net implements: " + "; ".join(problems))

    attn_res = [int(size) // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    head_dim = config.get("attention_head_dim")
    heads = 1 if head_dim is None else _heads(widths, down, head_dim)
    try:
        return ModelConfig(
            image_size=int(size), channels=int(config["in_channels"]), base_channels=widths[0],
            channel_mult=[w // widths[0] for w in widths], num_res_blocks=int(config["layers_per_block"]),
            attn_resolutions=attn_res, dropout=float(config.get("dropout") or 0.0), num_heads=heads,
        )
    except ConfigError as exc:
        raise InteropError(f"this UNet2DModel has no equivalent model config: {exc}") from None


def _heads(widths: list[int], down: list[str], head_dim: Any) -> int:
    """Our num_heads for diffusers' attention_head_dim: the same head count in every attention block, or refused."""
    attending = {widths[-1]} | {w for w, t in zip(widths, down) if t == "AttnDownBlock2D"}
    counts = {w // int(head_dim) if w % int(head_dim) == 0 else -1 for w in attending}
    if len(counts) != 1 or -1 in counts:
        raise InteropError(
            f"attention_head_dim={head_dim} gives attention blocks of widths {sorted(attending)} different head counts "
            "(ours: model.num_heads heads in every attention block); this model cannot be expressed in our U-Net"
        )
    return counts.pop()


# ------------------------------------------------------------------------------------------------ weights


def key_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> diffusers' key(s), in our module order; three keys (q, k, v) for a fused ``qkv``.

    Walks the levels as pipeline.model.unet.UNet builds them, tracking the widths, so that a residual block has a
    shortcut exactly where ours does.
    """
    res, attends = _levels(cfg)
    ch, nrb = cfg.base_channels, cfg.num_res_blocks
    out: dict[str, tuple[str, ...]] = {}

    def plain(ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = (f"{theirs}.{p}",)

    def resblock(ours: str, theirs: str, shortcut: bool) -> None:
        for a, b in _RES_PARTS.items():
            plain(f"{ours}.{a}", f"{theirs}.{b}")
        if shortcut:
            plain(f"{ours}.shortcut", f"{theirs}.conv_shortcut")

    def attention(ours: str, theirs: str) -> None:
        plain(f"{ours}.norm", f"{theirs}.group_norm")
        for p in ("weight", "bias"):
            out[f"{ours}.qkv.{p}"] = tuple(f"{theirs}.{q}.{p}" for q in _QKV)
        plain(f"{ours}.proj_out", f"{theirs}.to_out.0")

    plain("temb_dense0", "time_embedding.linear_1")
    plain("temb_dense1", "time_embedding.linear_2")
    plain("conv_in", "conv_in")
    cur, skips, i = ch, [ch], 0
    for level, m in enumerate(cfg.channel_mult):
        for j in range(nrb):
            resblock(f"down.{i}.res", f"down_blocks.{level}.resnets.{j}", cur != ch * m)
            cur = ch * m
            if attends[level]:
                attention(f"down.{i}.attn", f"down_blocks.{level}.attentions.{j}")
            skips.append(cur)
            i += 1
        if level != len(cfg.channel_mult) - 1:
            plain(f"down.{i}.down.conv", f"down_blocks.{level}.downsamplers.0.conv")
            skips.append(cur)
            i += 1
    resblock("mid_res1", "mid_block.resnets.0", False)
    attention("mid_attn", "mid_block.attentions.0")
    resblock("mid_res2", "mid_block.resnets.1", False)
    i = 0
    for k, (level, m) in enumerate(reversed(list(enumerate(cfg.channel_mult)))):
        for j in range(nrb + 1):
            resblock(f"up.{i}.res", f"up_blocks.{k}.resnets.{j}", cur + skips.pop() != ch * m)
            cur = ch * m
            if attends[level]:
                attention(f"up.{i}.attn", f"up_blocks.{k}.attentions.{j}")
            i += 1
        if level != 0:
            plain(f"up.{i}.up.conv", f"up_blocks.{k}.upsamplers.0.conv")
            i += 1
    plain("norm_out", "conv_norm_out")
    plain("conv_out", "conv_out")
    return out


def our_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The shape of every tensor of our U-Net for ``cfg`` (built on the meta device: no memory, no init cost)."""

    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(cfg).state_dict().items()}


def _check_keys(given: set[str], expected: set[str], whose: str) -> None:
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        raise InteropError(
            f"the {whose} weights do not fit the model config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}); the weights and their config.json/config.yaml must come "
            "from the same model"
        )


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our U-Net state dict -> a ``UNet2DModel`` state dict (copies; ``qkv`` split into q, k, v)."""
    mapping, shapes = key_map(cfg), our_shapes(cfg)
    _check_keys(set(state), set(mapping), "our")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in mapping.items():
        t = state[ours]
        if t.shape != shapes[ours]:
            raise InteropError(f"{ours} has shape {tuple(t.shape)}, the model config says {tuple(shapes[ours])}")
        parts = t.chunk(3, dim=0) if len(theirs) == 3 else (t,)
        out.update({name: p.clone().contiguous() for name, p in zip(theirs, parts)})
    return out


def from_diffusers(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict (the DDPM layout of ``cfg``) -> our U-Net state dict (``qkv`` stacked)."""
    mapping, shapes = key_map(cfg), our_shapes(cfg)
    _check_keys(set(state), {k for names in mapping.values() for k in names}, "diffusers")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in mapping.items():
        parts = [state[name] for name in theirs]
        t = torch.cat(parts, dim=0) if len(parts) == 3 else parts[0].clone()
        if t.shape != shapes[ours] or any(p.shape != parts[0].shape for p in parts):
            raise InteropError(f"{', '.join(theirs)}: shape {[tuple(p.shape) for p in parts]} does not give {ours} "
                               f"of shape {tuple(shapes[ours])}")
        out[ours] = t.contiguous()
    return out


# --------------------------------------------------------------------------------------------- schedule


def scheduler_config(cfg: DiffusionConfig) -> dict[str, Any]:
    """``DDPMScheduler(**this)`` samples as our ancestral sampler does: the same β_t, variance, prediction and the
    clipping of x̂0 to [-1, 1]. (At t = 0 both add no noise, so our β̃_1 in place of β_0 never enters a sample.)"""
    return {
        "num_train_timesteps": cfg.timesteps,
        "beta_schedule": _SCHEDULES[cfg.schedule],
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "variance_type": _VARIANCES[cfg.variance],
        "prediction_type": _PREDICTIONS[cfg.prediction],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "trained_betas": None,
    }


def diffusion_config_from_scheduler(config: Mapping[str, Any]) -> tuple[DiffusionConfig, list[str]]:
    """Our DiffusionConfig for a ``DDPMScheduler`` config (defaults filled in), and notes on sampler settings ours
    does not share (they change how diffusers samples, not what the weights mean); InteropError for a schedule,
    variance or prediction ours does not have."""
    problems = []
    schedule = {v: k for k, v in _SCHEDULES.items()}.get(config.get("beta_schedule"))
    if config.get("trained_betas") is not None:
        problems.append("trained_betas is set (ours: a linear or cosine schedule)")
    if schedule is None:
        problems.append(f"beta_schedule={config.get('beta_schedule')!r} (ours: 'linear' or 'squaredcos_cap_v2')")
    # fixed_small_log is fixed_small computed in log space: the same σ_t
    variance = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall",
                "fixed_small_log": "fixedsmall"}.get(config.get("variance_type"))
    if variance is None:
        problems.append(f"variance_type={config.get('variance_type')!r} (ours: fixed_large or fixed_small)")
    prediction = {v: k for k, v in _PREDICTIONS.items()}.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        problems.append(f"prediction_type={config.get('prediction_type')!r} (ours: epsilon, sample or v_prediction)")
    if problems:
        raise InteropError("this DDPMScheduler has no equivalent diffusion config: " + "; ".join(problems))
    notes = []
    if not config.get("clip_sample", True) or float(config.get("clip_sample_range", 1.0)) != 1.0:
        notes.append(f"the scheduler's clip_sample={config.get('clip_sample')} (range "
                     f"{config.get('clip_sample_range', 1.0)}); our samplers always clip x0 to [-1, 1]")
    if config.get("thresholding"):
        notes.append("the scheduler uses dynamic thresholding; our samplers clip x0 to [-1, 1] instead")
    try:
        cfg = DiffusionConfig(timesteps=int(config["num_train_timesteps"]), schedule=schedule,
                              beta_start=float(config.get("beta_start", 1e-4)),
                              beta_end=float(config.get("beta_end", 0.02)), prediction=prediction, variance=variance)
    except ConfigError as exc:
        raise InteropError(f"this DDPMScheduler has no equivalent diffusion config: {exc}") from None
    return cfg, notes


def check_betas(ours: torch.Tensor, theirs: torch.Tensor, what: str = "the scheduler") -> float:
    """Refuse unless ``theirs`` (diffusers', float32) are our float64 β_t to float32 rounding; returns the largest
    relative difference."""
    if ours.shape != theirs.shape:
        raise InteropError(f"{what} has {theirs.numel()} timesteps, ours {ours.numel()}")
    rel = ((theirs.double() - ours) / ours).abs().max().item()
    if not rel <= 1e-6:  # a few float32 ulps; a different schedule differs by far more
        raise InteropError(f"{what}'s β_t differ from ours by up to {rel:.3g} (relative): not the same schedule")
    return rel


def describe(cfg: ModelConfig | DiffusionConfig) -> str:
    """``key=value`` pairs of a config, for messages."""
    return ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))
