"""Choosing the EMA after training: EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Section 3 and Appendix C.2) on our checkpoints.

A power-function EMA with exponent gamma averages the weights of steps ``tau <= t`` with the profile
``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` (EDM2 eq. 3); its width relative to ``t``,
``sigma_rel = ((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))^(1/2)`` (eq. 4), names it. ``pipeline.train.ema`` keeps such
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

Which EMA a name means, and the weights of any of them, is ``pipeline.checkpoint.weights``; this module is the
algebra, the snapshot files and the synthesis.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint.folder import (
    Checkpoint,
    CheckpointError,
    ema_file,
    ema_name,
    load_weights_file,
    save_weights_file,
    weights_metadata,
)
from pipeline.config import SIGMA_REL_MAX, EMAConfig
from pipeline.data.manifest import sha256_file
from pipeline.files import UnsafeFileError, inside

POSTHOC_DIR = "posthoc"
SNAPSHOT_FORMAT = "ddpm-posthoc-snapshot-1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}



# --------------------------------------------------------------------------------------- EDM2's algebra


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's exponent for a relative width (``std_to_exp``: the largest real root of eq. 4 solved for gamma)."""

    t = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


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


def file_metadata(path: Path) -> dict[str, Any]:
    """A weights file's metadata (header bounded, JSON checked: CheckpointError otherwise)."""
    return weights_metadata(path)


# -------------------------------------------------------------------------------- what a checkpoint holds


@dataclass(frozen=True)
class _Profile:
    file: str  # relative to the checkpoint folder
    gamma: float
    t: int


def stored_profiles(ckpt: Checkpoint) -> tuple[list[_Profile], int]:
    """The power-function profiles a checkpoint holds (its power EMAs, then its snapshots, without repeats) and
    the target time t (steps applied at the checkpoint)."""
    live = []
    for name in ckpt.ema_names():
        meta = file_metadata(ckpt.path / ema_file(name))
        if "gamma" in meta:
            live.append(_Profile(ema_file(name), float(meta["gamma"]), int(meta["t"])))
    if not live:
        raise CheckpointError(f"{ckpt.path} holds no power-function EMAs to synthesize from; train with "
                              "ema.posthoc.sigma_rels=[0.05,0.10] (EDM2's) to keep them")
    seen = {(p.gamma, p.t) for p in live}
    snaps = []
    folder = ckpt.path / POSTHOC_DIR
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:  # the snapshot list: files inside the folder only (Checkpoint refuses symlinks out when it opens)
            inside(ckpt.path, f"{POSTHOC_DIR}/{path.name}", what="a post-hoc snapshot:")
        except UnsafeFileError as exc:
            raise CheckpointError(f"{ckpt.path} is refused: {exc}; use another checkpoint") from None
        meta = file_metadata(path)
        key = (float(meta["gamma"]), int(meta["t"]))
        if key not in seen and key[1] > 0:
            seen.add(key)
            snaps.append(_Profile(f"{POSTHOC_DIR}/{path.name}", *key))
    t = live[0].t
    if t <= 0:
        raise CheckpointError(f"{ckpt.path}: no optimizer step was applied before it; nothing to synthesize")
    return live + snaps, t


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files whose sha256 matched, this process


def verify_files(ckpt: Checkpoint, files: list[str]) -> None:
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
    found, t = stored_profiles(ckpt)
    verify_files(ckpt, [p.file for p in found])
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    x = solve_posthoc_coefficients([p.t for p in found], [p.gamma for p in found], [t] * len(gammas), gammas)
    if not np.isfinite(x).all():
        raise CheckpointError(f"{ckpt.path}: the post-hoc EMA coefficients are not finite (the stored profiles are "
                              "linearly dependent); check the posthoc/ snapshots")
    acc: list[dict[str, torch.Tensor]] = []
    for i, p in enumerate(found):
        weights = load_weights_file(ckpt.path / p.file)["weights"]
        if not acc:
            acc = [{k: torch.zeros(v.shape, dtype=torch.float32) if v.is_floating_point() else v.clone()
                    for k, v in weights.items()} for _ in gammas]
        for k, out in enumerate(acc):
            for key, v in weights.items():
                if v.is_floating_point():
                    out[key].add_(v.float(), alpha=float(x[i, k]))
    return {ema_name("sigma", s): w for s, w in zip(sigma_rels, acc)}
