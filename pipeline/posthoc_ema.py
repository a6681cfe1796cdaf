"""Choosing the EMA after training: EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Section 3 and Appendix C.2) on our checkpoints.

A power-function EMA with exponent gamma averages the weights of steps ``tau <= t`` with the profile
``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` (EDM2 eq. 3); its width relative to ``t``,
``sigma_rel = ((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))^(1/2)`` (eq. 4), names it. ``pipeline.ema`` keeps such
EMAs with ``beta_t = (1 - 1/t)^(gamma + 1)``, which makes the EMA at step t exactly the profile integrated over
each step (``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)`` for the weights of step tau), and stores
snapshots of them in the checkpoints. The EMA of any other profile at time ``t_r`` is then a linear
combination of the stored ones: the coefficients minimise the L2 distance between the profiles, a linear
system of their inner products (EDM2's ``solve_posthoc_coefficients``; Algorithm 3 of the paper).

At a checkpoint of step S the inputs are the snapshots it holds (``posthoc/sigma<s>-step<N>.safetensors``,
steps <= S) and the power EMAs themselves at S (``ema-sigma<s>.safetensors``, fp32), and the target time is S's
``t`` (optimizer steps applied). ``t`` counts applied steps only: a skipped step is not on the time axis.

A classic EMA (constant decay, ema-pytorch's warm-up) has a sigma_rel too: the standard deviation of its
averaging profile, computed from its schedule at that checkpoint (``classic_sigma_rel``), divided by the
step count; for a constant decay beta after many steps it is ``sqrt(beta) / (1 - beta) / t``.

Callers get the weights of any EMA by name with ``ema_weights(checkpoint, name)``: ``""`` or the primary's
name (``decay0.9999``), a stored classic (``decay0.999``) or power (``sigma0.05``) EMA, or ``sigma<x>`` for one
synthesized from the snapshots.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoint import Checkpoint, CheckpointError, save_weights_file
from pipeline.config import SIGMA_REL_MAX, EMAConfig
from pipeline.data.manifest import sha256_file
from pipeline.ema import PRIMARY, ema_name, sigma_rel_to_gamma

POSTHOC_DIR = "posthoc"
SNAPSHOT_FORMAT = "ddpm-posthoc-snapshot-1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_NAME = re.compile(r"^(decay|sigma)([0-9.eE+-]+)$")

__all__ = ["EMAChoice", "classic_sigma_rel", "ema_weights", "gamma_to_sigma_rel", "parse_sigma_rels",
           "power_function_correlation", "sigma_rel_to_gamma", "solve_posthoc_coefficients", "stored_emas",
           "synthesize"]


# --------------------------------------------------------------------------------------- EDM2's algebra


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 4 (``exp_to_std``)."""
    g = float(gamma)
    return math.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def power_function_correlation(a_t: np.ndarray, a_gamma: np.ndarray, b_t: np.ndarray, b_gamma: np.ndarray
                               ) -> np.ndarray:
    """Inner product of the profiles of power-function EMAs (a_t, a_gamma) and (b_t, b_gamma), broadcast."""
    a_t, a_gamma, b_t, b_gamma = (np.asarray(x, dtype=np.float64) for x in (a_t, a_gamma, b_t, b_gamma))
    t_ratio = a_t / b_t
    t_exp = np.where(a_t < b_t, b_gamma, -a_gamma)
    t_max = np.maximum(a_t, b_t)
    return (a_gamma + 1) * (b_gamma + 1) * t_ratio ** t_exp / ((a_gamma + b_gamma + 1) * t_max)


def solve_posthoc_coefficients(in_t, in_gamma, out_t, out_gamma) -> np.ndarray:
    """(inputs x outputs) coefficients: output k = sum_i X[i, k] * input i, least squares between the profiles,
    each column normalised to sum 1 (as EDM2's)."""
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)  # noqa: E731
    a = power_function_correlation(col(in_t), col(in_gamma), row(in_t), row(in_gamma))
    b = power_function_correlation(col(in_t), col(in_gamma), row(out_t), row(out_gamma))
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0)


def classic_coefficients(cfg: EMAConfig, decay: float, num_updates: int) -> np.ndarray:
    """Weight of the live weights after update n (n = 1..num_updates) in a classic EMA after ``num_updates``
    updates of ``cfg``'s schedule with ``decay`` (float64; the first update copies, so they sum to 1)."""
    n = np.arange(1, num_updates + 1, dtype=np.float64)
    done = n - 1  # updates before this one (ema-pytorch's step counter)
    w = np.zeros(num_updates)
    averaging = (done % cfg.update_every == 0) & (done > cfg.warmup_steps)
    if cfg.warmup == "none":
        w[averaging] = 1.0 - decay
    else:
        epoch = np.maximum(n - cfg.warmup_steps - 1, 0.0)
        value = np.clip(1.0 - (1.0 + epoch) ** -cfg.power, 0.0, decay)
        value[n - cfg.warmup_steps - 1 <= 0] = 0.0
        w[averaging] = 1.0 - value[averaging]
    w[(done % cfg.update_every == 0) & (done <= cfg.warmup_steps)] = 1.0  # the copies
    w[0] = 1.0
    keep = np.cumprod((1.0 - w)[::-1])[::-1]  # keep[n] = prod_{m >= n} (1 - w_m)
    later = np.append(keep[1:], 1.0)
    return w * later


def profile_sigma_rel(coefficients: np.ndarray) -> float:
    """The relative width of an averaging profile given as the weights of steps 1..t (each step's weights held
    over (tau - 1, tau], as EDM2's continuous profiles are): its standard deviation divided by t."""
    c = np.asarray(coefficients, dtype=np.float64)
    t = len(c)
    tau = np.arange(1, t + 1, dtype=np.float64) - 0.5
    c = c / c.sum()
    mean = float(np.sum(c * tau))
    var = float(np.sum(c * (tau - mean) ** 2)) + 1.0 / 12.0
    return math.sqrt(var) / t


def classic_sigma_rel(cfg: EMAConfig, decay: float, num_updates: int) -> float:
    """A classic EMA's equivalent sigma_rel at a checkpoint: the relative width of its actual profile."""
    return profile_sigma_rel(classic_coefficients(cfg, decay, num_updates)) if num_updates > 0 else math.nan


def parse_sigma_rels(spec: str) -> list[float]:
    """``LO:HI:N`` (N values spaced geometrically from LO to HI, 3 significant digits) or ``A,B,...``."""
    try:
        if ":" in spec:
            lo, hi, num = spec.split(":")
            n = int(num)
            if n < 1 or not 0 < float(lo) <= float(hi):
                raise ValueError
            values = [float(f"{v:.3g}") for v in np.geomspace(float(lo), float(hi), n)] if n > 1 else [float(lo)]
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--posthoc-sigma-rels {spec!r}: write LO:HI:N (e.g. 0.03:0.20:8, N values spaced "
                         "geometrically) or a list (e.g. 0.05,0.08,0.12)") from None
    bad = [v for v in values if not 0.0 < v < SIGMA_REL_MAX]
    if not values or bad:
        raise ValueError(f"--posthoc-sigma-rels {spec!r}: each sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}); got "
                         f"{bad or 'none'}")
    return sorted(set(values))


# ---------------------------------------------------------------------------------- snapshot files


def snapshot_file(name: str, step: int) -> str:
    """Where the snapshot of power EMA ``name`` at ``step`` lives inside a checkpoint folder."""
    return f"{POSTHOC_DIR}/{name}-step{step:08d}.safetensors"


def write_snapshot(path: Path, state: dict[str, Any], *, step: int, dtype: str) -> str:
    """A power EMA's state (fp32) as a snapshot in ``dtype``; returns its sha256. Written once, inside the
    checkpoint folder of its step (published atomically with it)."""
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state["weights"].items()}
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the {state['sigma_rel']} power EMA overflows ema.posthoc.snapshot_dtype={dtype} "
                              f"(e.g. {bad[0]}); use ema.posthoc.snapshot_dtype=bf16 or fp32")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SNAPSHOT_FORMAT, "sigma_rel": state["sigma_rel"], "gamma": state["gamma"], "t": state["t"],
            "step": step, "dtype": dtype}
    save_weights_file(path, {"weights": weights}, meta)
    return sha256_file(str(path))


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the file stays one file on disk), or a copy where the file system refuses links."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # EXDEV (another file system), EPERM/ENOTSUP (no hard links), EMLINK
        shutil.copyfile(src, dst)


def _metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


# -------------------------------------------------------------------------------- what a checkpoint holds


@dataclass(frozen=True)
class EMAChoice:
    """One EMA of a checkpoint: stored (primary, classic, power) or synthesized (posthoc)."""

    name: str  # decay0.9999 | sigma0.05 | ...: the name on the command line and in MLflow
    kind: str  # primary | classic | power | posthoc
    sigma_rel: float  # its relative width at this checkpoint (a classic EMA: that of its profile)
    source: str  # what the weights come from, for a line of output


@dataclass(frozen=True)
class _Profile:
    file: str  # relative to the checkpoint folder
    gamma: float
    t: int


def _stored_file(name: str) -> str:
    return "ema.safetensors" if name == PRIMARY else f"ema-{name}.safetensors"


def stored_emas(ckpt: Checkpoint) -> list[EMAChoice]:
    """The EMAs a checkpoint stores, primary first, each with its sigma_rel at this checkpoint."""
    cfg = ckpt.config().ema
    out = []
    for name in ckpt.ema_names():
        meta = _metadata(ckpt.path / _stored_file(name))
        if "sigma_rel" in meta:
            out.append(EMAChoice(name, "power", float(meta["sigma_rel"]), _stored_file(name)))
            continue
        decay = float(meta.get("decay", cfg.decay))
        n = int(meta.get("num_updates", 0))
        kind = "primary" if name == PRIMARY else "classic"
        out.append(EMAChoice(ema_name("decay", decay), kind, classic_sigma_rel(cfg, decay, n), _stored_file(name)))
    return out


def _profiles(ckpt: Checkpoint) -> tuple[list[_Profile], int]:
    """The power-function profiles a checkpoint holds (its power EMAs, then its snapshots, without repeats) and
    the target time t (steps applied at the checkpoint)."""
    live = []
    for name in ckpt.ema_names():
        meta = _metadata(ckpt.path / _stored_file(name))
        if "gamma" in meta:
            live.append(_Profile(_stored_file(name), float(meta["gamma"]), int(meta["t"])))
    if not live:
        raise CheckpointError(f"{ckpt.path} holds no power-function EMAs to synthesize from; train with "
                              "ema.posthoc.sigma_rels=[0.05,0.10] (EDM2's) to keep them")
    seen = {(p.gamma, p.t) for p in live}
    snaps = []
    folder = ckpt.path / POSTHOC_DIR
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        meta = _metadata(path)
        key = (float(meta["gamma"]), int(meta["t"]))
        if key not in seen and key[1] > 0:
            seen.add(key)
            snaps.append(_Profile(f"{POSTHOC_DIR}/{path.name}", *key))
    t = live[0].t
    if t <= 0:
        raise CheckpointError(f"{ckpt.path}: no optimizer step was applied before it; nothing to synthesize")
    return live + snaps, t


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files whose sha256 matched, this process


def _verify(ckpt: Checkpoint, files: list[str]) -> None:
    """The files' sha256 against meta.json's record, each file once per process (CheckpointError if one differs)."""
    todo = []
    for rel in files:
        st = (ckpt.path / rel).stat()
        if (str((ckpt.path / rel).resolve()), st.st_size, st.st_mtime_ns) not in _VERIFIED:
            todo.append(rel)
    problems = ckpt.verify(todo) if todo else []
    if problems:
        raise CheckpointError(f"{ckpt.path}: {problems[0]}; use another checkpoint")
    for rel in todo:
        st = (ckpt.path / rel).stat()
        _VERIFIED.add((str((ckpt.path / rel).resolve()), st.st_size, st.st_mtime_ns))


def synthesize(ckpt: Checkpoint, sigma_rels: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """Post-hoc EMAs of the given sigma_rels at the checkpoint's time, {``sigma<x>``: U-Net state_dict (fp32)}:
    one pass over the stored profiles, each file read once."""
    profiles, t = _profiles(ckpt)
    _verify(ckpt, [p.file for p in profiles])
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    x = solve_posthoc_coefficients([p.t for p in profiles], [p.gamma for p in profiles], [t] * len(gammas), gammas)
    if not np.isfinite(x).all():
        raise CheckpointError(f"{ckpt.path}: the post-hoc EMA coefficients are not finite (the stored profiles are "
                              "linearly dependent); check the posthoc/ snapshots")
    acc: list[dict[str, torch.Tensor]] = []
    for i, p in enumerate(profiles):
        weights = load_file(str(ckpt.path / p.file))
        if not acc:
            acc = [{k: torch.zeros(v.shape, dtype=torch.float32) if v.is_floating_point() else v.clone()
                    for k, v in weights.items()} for _ in gammas]
        for k, out in enumerate(acc):
            for key, v in weights.items():
                if v.is_floating_point():
                    out[key].add_(v.float(), alpha=float(x[i, k]))
    return {ema_name("sigma", s): w for s, w in zip(sigma_rels, acc)}


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
    if name in ("", "primary", "ema"):
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
    CheckpointError (with the names there are) otherwise. This is the one function to select EMA weights."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    stored = stored_emas(ckpt)
    found = find_stored(ckpt, name, stored)
    if found is not None:
        _verify(ckpt, [_stored_file(found)])
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
        profiles, _ = _profiles(ckpt)
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
