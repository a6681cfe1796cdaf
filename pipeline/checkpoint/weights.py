"""Which weights of a checkpoint a name means, and the U-Net holding them: the one way weights leave a checkpoint.

    loaded = load_unet("runs/digits/step-00004000", "ema")          # the primary EMA
    loaded = load_unet(ckpt, "sigma0.08", device="cuda")             # a power EMA, synthesized if not stored
    loaded = load_unet("model/artifacts/ema.safetensors")            # a self-describing weights file
    loaded.net, loaded.model, loaded.diffusion, loaded.step

Names (``--weights`` of export and the MLflow model command, ``--ema`` of evaluate, ``eval.use_ema``):

- ``ema`` (also ``""`` and ``primary``): the primary EMA, ``ema.safetensors``;
- ``raw``: the training weights of the accelerate state (not under DeepSpeed, which shards them);
- ``decay<d>``: a classic EMA (``ema.decays``; the primary's own decay names the primary);
- ``sigma<s>``: a stored power-function EMA (``ema.posthoc.sigma_rels``), or, for any other ``0 < s < 0.2886``,
  one synthesized from the checkpoint's snapshots (pipeline.checkpoint.posthoc).

Every file read is checked against the sha256 that meta.json recorded (once per process). The network is built
from the model config stored with the weights (ema.safetensors is self-describing), so a caller that has its own
idea of the network (training's ``cfg.model`` for train.init_from, evaluation's config with overrides) passes it
as ``expect`` and gets a CheckpointError naming the keys that differ. Used by training's init_from, evaluation,
export and the MLflow model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint.folder import (
    EMA_FILE,
    PRIMARY,
    Checkpoint,
    CheckpointError,
    ema_file,
    ema_name,
    read_ema,
    weights_metadata,
)
from pipeline.checkpoint.posthoc import (
    classic_sigma_rel,
    file_metadata,
    stored_profiles,
    synthesize,
    verify_files,
)
from pipeline.config import SIGMA_REL_MAX, DiffusionConfig, ModelConfig, to_dict
from pipeline.model.unet import UNet

RAW = "raw"
PRIMARY_NAMES = ("", "ema", "primary")
WEIGHTS_HELP = ("ema (the primary EMA), raw (the training weights), or an EMA's name: decay<d>, sigma<s> "
                "(synthesized from the checkpoint's post-hoc snapshots where not stored)")
RAW_FILES = ("accelerate/model.safetensors", "accelerate/pytorch_model.bin")
_NAME = re.compile(r"^(decay|sigma)([0-9.eE+-]+)$")
_NOT_THE_NETWORK = ("dropout",)  # model keys that change training, not what the weights mean


# -------------------------------------------------------------------------------- what a checkpoint holds


@dataclass(frozen=True)
class EMAChoice:
    """One EMA of a checkpoint: stored (primary, classic, power) or synthesized (posthoc)."""

    name: str  # decay0.9999 | sigma0.05 | ...: the name on the command line and in MLflow
    kind: str  # primary | classic | power | posthoc
    sigma_rel: float  # its relative width at this checkpoint (a classic EMA: that of its profile)
    source: str  # what the weights come from, for a line of output


def stored_emas(ckpt: Checkpoint) -> list[EMAChoice]:
    """The EMAs a checkpoint stores, primary first, each with its sigma_rel at this checkpoint."""
    cfg = ckpt.config().ema
    out = []
    for name in ckpt.ema_names():
        meta = file_metadata(ckpt.path / ema_file(name))
        if "sigma_rel" in meta:
            out.append(EMAChoice(name, "power", float(meta["sigma_rel"]), ema_file(name)))
            continue
        decay = float(meta.get("decay", cfg.decay))
        n = int(meta.get("num_updates", 0))
        kind = "primary" if name == PRIMARY else "classic"
        out.append(EMAChoice(ema_name("decay", decay), kind, classic_sigma_rel(cfg, decay, n), ema_file(name)))
    return out


def _parse_name(name: str) -> tuple[str, float] | None:
    m = _NAME.match(name)
    if not m:
        return None
    try:
        return m.group(1), float(m.group(2))
    except ValueError:
        return None


def find_stored(ckpt: Checkpoint, name: str, stored: list[EMAChoice] | None = None) -> str | None:
    """The stored EMA a name means ("" for the primary, else its file name part), None if it is not stored.
    ``decay0.9999`` and ``decay0.99990`` are the same name; ``primary`` / ``ema`` / "" mean the primary."""
    if name in PRIMARY_NAMES:
        return PRIMARY
    parsed = _parse_name(name)
    if parsed is None:
        return None
    for choice in stored if stored is not None else stored_emas(ckpt):
        p = _parse_name(choice.name)
        if p is not None and p[0] == parsed[0] and math.isclose(p[1], parsed[1], rel_tol=1e-9):
            if choice.kind == "primary":
                return PRIMARY
            return choice.name
    return None


def ema_weights(ckpt: Checkpoint | str | Path, name: str = PRIMARY) -> dict[str, torch.Tensor]:
    """The U-Net state_dict (fp32) of the EMA called ``name`` in a checkpoint: stored (the primary for "",
    ``primary`` or its ``decay<d>`` name; ``decay<d>``; ``sigma<s>``) or, for a ``sigma<x>`` not stored,
    synthesized from the snapshots. The files read are checked against their recorded sha256 first.
    CheckpointError (with the names there are) otherwise."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    if name in PRIMARY_NAMES:  # without reading config.yaml (an imported checkpoint's may lack data.shards)
        verify_files(ckpt, [EMA_FILE])
        return ckpt.ema_weights(PRIMARY)
    stored = stored_emas(ckpt)
    found = find_stored(ckpt, name, stored)
    if found is not None:
        verify_files(ckpt, [ema_file(found)])
        return ckpt.ema_weights(found)
    parsed = _parse_name(name)
    if parsed is not None and parsed[0] == "sigma" and 0 < parsed[1] < SIGMA_REL_MAX:
        return synthesize(ckpt, [parsed[1]])[ema_name("sigma", parsed[1])]
    names = ", ".join(c.name for c in stored)
    how = "" if any(c.kind == "power" for c in stored) else " (no power EMAs here: sigma<x> cannot be synthesized)"
    raise CheckpointError(f"{ckpt.path} has no EMA {name!r}; it has {names}, and sigma<x> for any 0 < x < "
                          f"{SIGMA_REL_MAX:.4f} is synthesized from its snapshots{how}")


def choices(ckpt: Checkpoint, ema: str = "", sigma_rels: list[float] = ()) -> list[EMAChoice]:
    """What ``--ema all|NAME[,NAME]`` and ``--posthoc-sigma-rels`` ask for, in that order, without repeats;
    CheckpointError for a name that is not there."""
    stored = stored_emas(ckpt)
    out: list[EMAChoice] = []
    if ema == "all":
        out += stored
    elif ema:
        for name in [n.strip() for n in ema.split(",") if n.strip()]:
            found = find_stored(ckpt, name, stored)
            if found is None:
                parsed = _parse_name(name)
                if parsed is None or parsed[0] != "sigma":
                    raise CheckpointError(f"--ema {name!r}: {ckpt.path} has {', '.join(c.name for c in stored)} "
                                          "(or all); a sigma<x> not stored is synthesized")
                sigma_rels = [*sigma_rels, parsed[1]]
                continue
            out += [c for c in stored if (c.kind == "primary" if found == PRIMARY else c.name == found)]
    if sigma_rels:
        if not any(c.kind == "power" for c in stored):
            raise CheckpointError(f"--posthoc-sigma-rels: {ckpt.path} holds no power-function EMAs; train with "
                                  "ema.posthoc.sigma_rels=[0.05,0.10] to choose the EMA after training")
        profiles, _ = stored_profiles(ckpt)
        for s in sigma_rels:
            same = [c for c in stored if c.kind == "power" and math.isclose(c.sigma_rel, s, rel_tol=1e-9)]
            # a stored power EMA is what the synthesis of its own sigma_rel gives (in fp32): it is used instead
            out += same or [EMAChoice(ema_name("sigma", s), "posthoc", s, f"synthesized from {len(profiles)} "
                                      "profiles")]
    seen, unique = set(), []
    for c in out:
        if c.name not in seen:
            seen.add(c.name)
            unique.append(c)
    return unique


# ------------------------------------------------------------------------------------------ the U-Net


@dataclass
class LoadedUNet:
    """A U-Net with a checkpoint's chosen weights, in eval mode, and what the weights belong to."""

    net: UNet
    model: ModelConfig
    diffusion: DiffusionConfig
    step: int
    weights: str  # the name asked for
    path: Path  # the checkpoint folder or weights file read


def network_differences(saved: ModelConfig | dict, expect: ModelConfig) -> list[str]:
    """``model.<key>: checkpoint X, now Y`` for each key that changes what the weights mean (dropout aside)."""
    a = saved if isinstance(saved, dict) else to_dict(saved)
    return [f"model.{k}: checkpoint {a.get(k)!r}, now {v!r}" for k, v in to_dict(expect).items()
            if k not in _NOT_THE_NETWORK and a.get(k) != v]


def _state_of(ckpt: Checkpoint, weights: str, model: ModelConfig) -> dict[str, torch.Tensor]:
    if weights == RAW:
        with torch.device("meta"):
            expected = set(UNet(model).state_dict())
        present = [f for f in RAW_FILES if (ckpt.path / f).is_file()]
        verify_files(ckpt, present[:1])
        return ckpt.raw_weights(expected)
    return ema_weights(ckpt, PRIMARY if weights in PRIMARY_NAMES else weights)


def load_unet(source: str | Path | Checkpoint, weights: str = "ema", *, device: torch.device | str = "cpu",
              expect: ModelConfig | None = None, state: dict[str, torch.Tensor] | None = None) -> LoadedUNet:
    """The U-Net with ``weights`` (a name above) of ``source``: a complete checkpoint folder, or a self-describing
    weights file (``ema.safetensors``: the MLflow model's artifact; only ``ema`` then). ``state``: the weights,
    already at hand (a sweep synthesizes several EMAs in one pass), instead of reading them. ``expect``: the
    network the caller means; one that differs is refused naming the keys. Float32, eval mode, no gradients."""
    path = source.path if isinstance(source, Checkpoint) else Path(source)
    if path.is_file():  # a weights file: the network and the schedule are in its metadata
        if weights not in PRIMARY_NAMES:
            raise CheckpointError(f"{path} is a weights file holding one set of weights; --weights {weights} needs "
                                  "the checkpoint folder")
        state_read, meta = read_ema(path)
        state = state if state is not None else state_read
    else:
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint(path)
        verify_files(ckpt, [EMA_FILE])  # its metadata describes the weights' network and schedule
        meta = {**weights_metadata(ckpt.path / EMA_FILE), "step": ckpt.step}
        if state is None:
            state = _state_of(ckpt, weights, ModelConfig(**meta["model"]))
    try:
        model, diffusion = ModelConfig(**meta["model"]), DiffusionConfig(**meta["diffusion"])
    except (KeyError, TypeError) as exc:  # a weights file of another program, or a tampered one
        raise CheckpointError(f"{path}: the weights' metadata does not describe our U-Net and schedule ({exc!r}); "
                              "use a checkpoint or weights file this pipeline wrote") from None
    if expect is not None and (diffs := network_differences(model, expect)):
        raise CheckpointError(f"{path} holds weights of another network; differing keys: {'; '.join(diffs)}. Set "
                              "those keys to the checkpoint's (its config.yaml)")
    try:
        net = unet_with(state, model, device=device)
    except ValueError as exc:
        raise CheckpointError(f"{path}: the {weights or 'ema'} weights {exc}") from None
    return LoadedUNet(net, model, diffusion, int(meta.get("step", -1)), weights or "ema", path)


def unet_with(state: dict[str, torch.Tensor], model: ModelConfig, *, device: torch.device | str = "cpu") -> UNet:
    """The U-Net of ``model`` holding ``state`` (float32, eval mode, no gradients), built without a random
    initialisation; ValueError when the keys are not the network's. ``load_unet`` uses it for a checkpoint's
    weights; diffusers import uses it for weights converted from diffusers."""
    with torch.device("meta"):  # no random initialisation: every tensor is assigned below
        net = UNet(model)
    expected = set(net.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"do not fit the U-Net of their model config (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
    net.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return net.to(device).eval().requires_grad_(False)
