"""Evaluate a training checkpoint: samples, FID/KID with provenance, bits/dim, grids; log into the training run.

    python -m evaluation.evaluate --checkpoint runs/digits/step-00002000 eval.feature_extractor=digits
    python -m evaluation.evaluate --checkpoint runs/digits    # a run folder: its newest complete checkpoint
    python -m evaluation.evaluate --checkpoint CKPT eval.num_samples=50000 eval.sampler=ancestral \\
        eval.fid_mode=legacy_tensorflow eval.reference=clean-fid:cifar10/train/32     # the paper's protocol
    python -m evaluation.evaluate --watch runs/digits --poll-s 30                     # every new checkpoint once
    python -m evaluation.evaluate --checkpoint runs/digits --ema all --posthoc-sigma-rels 0.03:0.20:8
        # every stored EMA and 8 post-hoc EMA lengths, FID vs EMA length (docs/fid.md, "Sweeping the EMA")
    # several watchers (processes or hosts) on one out_dir share the work, each checkpoint still once:
    python -m evaluation.evaluate --watch runs/digits & python -m evaluation.evaluate --watch runs/digits
    # sampling spread over processes (image i still comes from seed eval.seed + i):
    accelerate launch --num_processes 8 -m evaluation.evaluate --checkpoint CKPT
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m evaluation.evaluate --checkpoint CKPT      # 2 CPU processes

The checkpoint folder (docs/architecture.md) gives the weights (``ema.safetensors``, or the raw weights
of ``accelerate/`` with ``eval.use_ema=false``), the resolved config (``config.yaml``; ``key=value``
overrides apply on top, e.g. ``eval.*`` or ``data.shards``) and the MLflow run (``meta.json``), into
which FID/KID/bits-per-dim are logged at the checkpoint's step with the protocol as tags
(docs/tracking.md), with two grids side by side: ``grid.png`` (the first eval.grid_images samples) and
``real.png`` (as many real images of the reference split), enlarged to at least 256 px wide. Only files
are read from the checkpoint: the training job is never waited for. What a checkpoint carries never runs or
fetches anything by itself (docs/security.md): a ``pipe:`` command or URL in its ``data.shards`` /
``data.manifest`` is used only when given again on the command line, and a tracking server in its meta.json is
logged into only when ``tracking.uri=`` or ``$MLFLOW_TRACKING_URI`` names it (else ``--no-log``).

Refused before sampling (exit 2): eval.feature_extractor=digits for data other than the digits net's own
(8x8 grey, 10 classes: evaluation/digits_net.py), and a clean-fid reference of another resolution than
the checkpoint's images. The digits classifier's figures (confident share, class histogram) are reported
only where that net fits the data, whatever the feature extractor.

With ``--watch``, a watcher claims a checkpoint before evaluating it (``<out_dir>/eval/ledger.d/claims/``,
a file created with O_EXCL, its mtime refreshed every ``--claim-stale-s``/6 s) and records it when done
(``ledger.d/done/``). A claim without a heartbeat for ``--claim-stale-s`` (its watcher was killed) is taken
over by another watcher, or by the same one restarted; the one that lost a claim reports nothing. Several
hosts need a shared file system with atomic rename and O_EXCL, and clocks that agree (docs/fid.md).

Exit codes as every command's (pipeline/cli.py): 0 done; 1 a failure that is not the input's (a bug, CUDA out
of memory, NCCL, ...: the traceback is printed); 2 an input to fix: arguments, configuration, checkpoint, data,
reference statistics, unavailable feature-extractor weights (one line ``evaluate: error: ...``); 3 ``--watch``
gave up after ``--max-wait-s`` with no new record, before the training wrote TRAINING_DONE or while other
watchers still held claims on the checkpoints left (what this watcher could claim was evaluated).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image

from evaluation import digits_net
from evaluation.errors import EvaluationError
from evaluation.features import build_extractor
from evaluation.fid import CLEANFID_PREFIX, fid, kid, load_reference, parse_cleanfid_spec
from evaluation.protocol import apply_protocol, overridden, recorded_name
from evaluation.watch import DEFAULT_CLAIM_STALE_S, StopReason, watch
from pipeline import cli, dist
from pipeline.checkpoint import posthoc
from pipeline.checkpoint.folder import (
    COMPLETE,
    DONE,
    EMA_FILE,
    STEP_RE,
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    step_dir_name,
)
from pipeline.checkpoint.weights import RAW, choices, load_unet
from pipeline.config import Config
from pipeline.data.manifest import read_manifest
from pipeline.data.report import DataError
from pipeline.data.sequential import iter_split, split_batches
from pipeline.data.shards import resolve_shards
from pipeline.model.diffusion import Diffusion, bound_per_image, summarize_bound
from pipeline.model.sampling import sample
from pipeline.tracking.factory import make_sink
from pipeline.tracking.images import image_grid
from pipeline.tracking.sink import read_run_file, ui_hint

log = logging.getLogger("evaluation")
EMA_METRIC_PREFIX = "eval/ema/"  # --ema / --posthoc-sigma-rels: eval/ema/<name>/fid_<ext>, .../sigma_rel, ...


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]
    provenance: dict[str, Any]
    out_dir: str
    logged_to_run: str | None = None  # MLflow run id, when logged
    classifier: dict[str, Any] = field(default_factory=dict)  # digits: confident share + class histogram
    grids: dict[str, str] = field(default_factory=dict)  # "samples" / "real" -> PNG path (figures folder)
    real_grid_note: str = ""  # which real images real.png shows, or why it was not written
    mlflow_ui: str = ""  # where the run is in the MLflow UI (pipeline.tracking.sink.ui_hint), when logged


# ------------------------------------------------------------------------------------------- loading


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A complete checkpoint folder (pipeline.checkpoint.folder.Checkpoint), or EvaluationError saying why not."""
    try:
        return Checkpoint(path, what="--checkpoint")
    except CheckpointError as exc:
        raise EvaluationError(f"{exc}; or use --watch to wait for new ones") from None


def read_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    announce: bool = False) -> tuple[Config, dict]:
    """The resolved config (with overrides and eval.protocol's settings: evaluation/protocol.py) and meta.json of
    a complete checkpoint folder; ``announce`` prints (rank 0) what the protocol set or left to the overrides."""

    ckpt = open_checkpoint(path)
    cfg, lines = apply_protocol(ckpt.config_to_run(overrides), overrides)
    for line in lines if announce and dist.is_main() else []:
        print(line, flush=True)
    return cfg, ckpt.meta


GRID_MIN_WIDTH = 256  # px: the grids are enlarged (nearest neighbour, integer factor) to at least this width
SAMPLES_GRID, REAL_GRID = "grid.png", "real.png"
# what an evaluation reads from a checkpoint; a run folder's newest checkpoint must match its recorded sha256
EVALUATED_FILES = (EMA_FILE, "config.yaml", "accelerate/model.safetensors", "accelerate/pytorch_model.bin")


def checkpoint_of(path: str | Path) -> tuple[Path, str]:
    """``--checkpoint``: a step-NNNNNNNN folder as given, or, for a run folder (a training's out_dir), its newest
    complete checkpoint whose weights and config match the sha256 recorded at save; with the line to print."""
    path = Path(path)
    if not path.is_dir() or (path / COMPLETE).exists() or STEP_RE.match(path.name) or path.name.startswith(".tmp-"):
        return path, ""  # a checkpoint folder (or not a folder): open_checkpoint says what is wrong with it
    found = complete_checkpoints(path)
    if not found:
        raise EvaluationError(
            f"{path} holds no complete checkpoint (a step-NNNNNNNN folder with a {COMPLETE} marker); wait for the "
            f"training to write one, or evaluate each one as it is written with --watch {path}"
        )
    for ckpt in reversed(found):
        try:
            problems = Checkpoint(ckpt).verify(list(EVALUATED_FILES))
        except CheckpointError as exc:  # an unreadable meta.json, or one naming files outside the folder
            problems = [str(exc)]
        if not problems:
            return ckpt, (f"{path} is a run folder; evaluating its newest complete checkpoint {path / ckpt.name}")
        print(f"{path / ckpt.name} fails verification: {problems[0]}; trying the next older one", file=sys.stderr)
    raise EvaluationError(f"none of the {len(found)} complete checkpoints in {path} passes verification (see above); "
                          "give a step-NNNNNNNN folder with --checkpoint to evaluate one anyway")


def load_network(ckpt: str | Path, cfg: Config, use_ema: bool, device: torch.device,
                 weights: dict[str, torch.Tensor] | None = None, ema: str = "") -> torch.nn.Module:
    """The U-Net with the checkpoint's EMA (or raw training) weights, or the EMA named ``ema`` (--ema), or
    ``weights`` (that EMA's, at hand already: synthesized in one pass for a sweep), in eval mode
    (pipeline.checkpoint.weights.load_unet); ``cfg.model`` must be the network the weights belong to (a model.*
    override that changes it is refused, naming the keys)."""
    which = ema or ("ema" if use_ema else RAW)
    try:
        return load_unet(open_checkpoint(ckpt), which, device=device, expect=cfg.model, state=weights).net
    except CheckpointError as exc:
        raise EvaluationError(f"{exc}" + ("" if use_ema or ema else " (eval.use_ema=false)")) from None


# ------------------------------------------------------------------------------------------- the plan


def samples_needed(e, classifier_fits: bool, saving: bool) -> int:
    """How many images to sample: eval.num_samples where they are used (FID/KID, the digits classifier's
    figures, ``--save-samples``), else only the grid's (eval.feature_extractor=none on data the digits
    classifier does not fit: nothing but the grid looks at them)."""
    if e.feature_extractor != "none" or classifier_fits or saving:
        return e.num_samples
    return min(e.grid_images, e.num_samples)


def _offline_alternative(digits_data: bool) -> str:
    """What the offline InceptionV3 error offers instead, for this checkpoint's data."""
    if digits_data:
        return ("Without it, for these digits: eval.feature_extractor=digits (a digits-feature FID, not "
                "Inception FID).")
    return ("Without it: eval.feature_extractor=none (no FID: the sample grid and bits/dim only; "
            "eval.feature_extractor=digits fits only scikit-learn's 8x8 grey digits).")


def _bpd_images(cfg: Config) -> int | None:
    """Held-out images bits/dim will use (all ranks together), or None when it is skipped or the split is
    missing (said later, as a counted skip)."""
    e = cfg.eval
    if not e.bpd_split:
        return None
    splits = read_manifest(cfg.data.shards).splits
    if e.bpd_split not in splits:
        return None
    return min(e.bpd_max_images, sum(s.num_samples for s in splits[e.bpd_split]))


def sampling_calls_per_image(cfg: Config, diffusion: Diffusion) -> int:
    """Network evaluations per sampled image: every t for ancestral sampling, eval.steps for DDIM."""
    return diffusion.num_timesteps if cfg.eval.sampler == "ancestral" else cfg.eval.steps


def bpd_calls_per_image(cfg: Config, diffusion: Diffusion) -> int:
    """Network evaluations per held-out image for bits/dim: T for the exact sum, K + 1 for the K-term estimate."""
    k = cfg.eval.bpd_timesteps
    return k + 1 if k else diffusion.num_timesteps


def seconds_per_image_call(net, cfg: Config, device: torch.device, repeats: int = 2) -> float:
    """Seconds of one network evaluation of one image on this device, timed on one sampling batch (the best
    of ``repeats`` after a warm-up) at the sampling precision: the unit of the time estimate."""
    e = cfg.eval
    batch = max(1, min(e.batch_size, 64))
    x = torch.zeros(batch, net.in_channels, net.image_size, net.image_size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    best = math.inf
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=e.precision == "bf16"):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            net(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up (allocations, kernels)
                best = min(best, time.perf_counter() - t0)
    return best / batch


def plan(cfg: Config, diffusion: Diffusion, bpd_images: int | None, sec_per_call: float) -> str:
    """What evaluate is about to do and how long it should take (network evaluations only, split over the
    processes; feature extraction and reference statistics come on top)."""
    e = cfg.eval
    world = dist.world_size()
    per_sample = sampling_calls_per_image(cfg, diffusion)
    sampler = f"ancestral, {per_sample} steps" if e.sampler == "ancestral" else f"DDIM, {per_sample} steps"
    why = ("" if e.num_samples > e.grid_images or e.feature_extractor != "none"
           else " (only the grid's: eval.feature_extractor=none)")
    calls = e.num_samples * per_sample
    parts = [f"evaluate: {e.num_samples} samples{why} ({sampler}: {calls:,} network evaluations)"]
    if bpd_images:
        per_bpd = bpd_calls_per_image(cfg, diffusion)
        how = f"K={e.bpd_timesteps} timesteps" if e.bpd_timesteps else f"exact, all {diffusion.num_timesteps} terms"
        parts.append(f"bits/dim on {bpd_images} held-out images ({how}: {bpd_images * per_bpd:,} network "
                     "evaluations)")
        calls += bpd_images * per_bpd
    seconds = calls * sec_per_call / world
    where = f"{world} processes" if world > 1 else "this process"
    return "; ".join(parts) + f"; about {_duration(seconds)} on {where} (timed from one batch)"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ sampling


def seed_block(num: int, rank: int, world: int) -> range:
    """Indices 0..num-1 of this rank: contiguous blocks, so gathering in rank order restores seed order."""
    per = math.ceil(num / world)
    return range(min(rank * per, num), min((rank + 1) * per, num))


def draw_samples(net, diffusion, cfg: Config, device: torch.device, features=None,
                 keep_images: int | None = None) -> tuple[np.ndarray | None, float, np.ndarray | None]:
    """uint8 (N, C, H, W) for seeds eval.seed .. eval.seed+N-1 on rank 0 (None elsewhere), images/s, and,
    given a feature extractor, the images' features (N, D) on rank 0.

    Each rank samples a disjoint contiguous block of seeds, and extracts its block's features; since image
    i depends only on its seed (pipeline/model/sampling.py), the gathered set equals the one-process set.
    Only rank 0 receives, and with ``keep_images`` only the first that many images travel (the grid's):
    10k 256x256 images would be 2 GB, their features 80 MB.
    """

    e = cfg.eval
    mine = seed_block(e.num_samples, dist.rank(), dist.world_size())
    t0 = time.perf_counter()
    local = sample(
        net, diffusion, [e.seed + i for i in mine], sampler=e.sampler, steps=e.steps, eta=e.eta,
        batch_size=e.batch_size, device=device, progress=dist.is_main(), precision=e.precision, spacing=e.spacing,
    ).numpy()
    elapsed = time.perf_counter() - t0
    feats = features(local, desc="sample features") if features is not None and len(local) else None
    sent = local if keep_images is None else local[: max(0, keep_images - mine.start)]
    parts = dist.gather_object((sent, elapsed, feats))  # gloo group: host objects, whatever the device backend
    if parts is None:
        return None, 0.0, None
    images = np.concatenate([p[0] for p in parts])
    all_feats = np.concatenate([p[2] for p in parts if p[2] is not None]) if features is not None else None
    rate = e.num_samples / max(p[1] for p in parts)
    return images, rate, all_feats


def save_samples(images: np.ndarray, dest: str | Path, seed0: int) -> Path:
    """``*.npz`` (images, seeds) or a folder of PNGs named by seed."""

    dest = Path(dest)
    seeds = np.arange(seed0, seed0 + len(images))
    if dest.suffix == ".npz":
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dest, images=images, seeds=seeds)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for img, s in zip(images, seeds):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr).save(dest / f"seed{s:08d}.png")
    return dest


# ---------------------------------------------------------------------------------------- bits / dim


def held_out_batches(shards: str, split: str, max_images: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """Deterministic batches {"image": float in [-1, 1], "label", "index": positions in the split} of a split,
    in manifest order, decoded and scaled exactly as the training loader does; with ``world_size`` > 1,
    batch k goes to rank k mod world_size (the others only read it)."""

    return split_batches(shards, split, batch_size, rank=rank, world_size=world_size, max_images=max_images)


# ------------------------------------------------------------------------------ what fits the data


def data_facts(cfg: Config) -> tuple[int, int, int, str]:
    """(image size, channels, class count, source kind) of the evaluated data: the geometry from the
    checkpoint's config (what the samples are), the class count (-1: unknown, no manifest.json) and the
    source kind (``digits``, ``folder``, ...) from the manifest of ``data.shards``."""

    shardset = resolve_shards(cfg.data.shards, cfg.data.split, need_counts=False)
    has_manifest = bool(shardset.image_size)  # 0 = shards without a manifest.json
    kind = ""
    if has_manifest:
        try:
            source = read_manifest(cfg.data.shards).raw.get("source")
            kind = str(source.get("kind", "")) if isinstance(source, dict) else ""
        except DataError:
            kind = ""  # a brace pattern or URL list: its manifest gave the counts, the kind is not needed
    size = cfg.model.image_size or shardset.image_size
    channels = cfg.model.channels or shardset.channels
    return size, channels, shardset.num_classes if has_manifest else -1, kind


def check_fits(cfg: Config) -> bool:
    """Refuse (EvaluationError, before anything is sampled) a protocol that cannot give a meaningful figure
    for this checkpoint; return whether the digits classifier fits its data (its figures are reported only
    then). Data that cannot be read raises DataError here too, rather than after the sampling."""

    e = cfg.eval
    size = cfg.model.image_size
    if e.reference.startswith(CLEANFID_PREFIX):
        res = parse_cleanfid_spec(e.reference)[2]
        if res.isdigit() and size and int(res) != size:
            raise EvaluationError(
                f"eval.reference={e.reference!r} holds statistics of {res}x{res} images but this checkpoint makes "
                f"{size}x{size} images (model.image_size); use clean-fid statistics at resolution {size}, or a "
                "split of the data shards (eval.reference=train)"
            )
    if e.feature_extractor == "digits":
        misfit = digits_net.misfit(*data_facts(cfg))
        if misfit:
            raise EvaluationError(
                f"eval.feature_extractor=digits: the digits network ({digits_net.NAME}) was trained on scikit-learn's "
                f"8x8 grey digits (10 classes), and the data of this checkpoint ({cfg.data.shards}) differs: "
                f"{'; '.join(misfit)}; its FID and class figures would mean nothing. Use "
                "eval.feature_extractor=inception (clean-fid's InceptionV3; offline: eval.inception_weights=PATH)"
            )
        return True
    if not cfg.data.shards:
        return False
    try:
        return not digits_net.misfit(*data_facts(cfg))
    except DataError:
        return False  # e.g. a clean-fid reference without readable shards: no class figures, nothing else lost


def real_images(cfg: Config, count: int) -> tuple[np.ndarray | None, str]:
    """The first ``count`` images of the reference split (of the training split for a clean-fid reference),
    in manifest order through the one data path, for the grid beside the samples; else None, and why not."""

    e = cfg.eval
    cleanfid = e.reference.startswith(CLEANFID_PREFIX)
    split = cfg.data.split if cleanfid else e.reference
    if not cfg.data.shards:
        return None, "data.shards is not set"
    try:
        images = [s.image for s in iter_split(cfg.data.shards, split, count)]
    except DataError as exc:
        return None, f"split {split!r} of {cfg.data.shards} cannot be read ({exc})"
    if not images:
        return None, f"split {split!r} of {cfg.data.shards} holds no readable image"
    whose = "the training split: clean-fid's reference images are not at hand" if cleanfid else "the reference split"
    return np.stack(images), f"the first {len(images)} images of split {split!r} ({whose})"


# --------------------------------------------------------------------------------------- the stage


def _provenance(cfg: Config, meta: dict, extractor, ref, ckpt: Path, diffusion) -> dict[str, Any]:
    """What the figures were computed from; the FID keys only when FID was (eval.feature_extractor != none)."""

    e = cfg.eval
    fid_keys: dict[str, Any] = {"extractor": "none"}
    if extractor is not None:
        ref_prov = ref.provenance
        if ref_prov["source"] == "shards":
            reference = f"shards:{ref_prov['split']}"
        else:
            reference = f"clean-fid:{ref_prov['name']}/{ref_prov['split']}/{ref_prov['resolution']}"
        fid_keys = {
            "extractor": extractor.name,
            "extractor_sha256": extractor.weights_sha256,
            "mode": extractor.fid_mode,
            "resize": extractor.resize,
            "reference": reference,
            "reference_count": int(ref_prov["count"]),
            "reference_sha256": ref.stats_sha256,
            "reference_location": ref_prov.get("location", ""),
            "reference_manifest_sha256": ref_prov.get("manifest_sha256", ""),
        }
    return {
        **fid_keys,
        "num_samples": e.num_samples,
        "seeds": f"{e.seed}..{e.seed + e.num_samples - 1}",
        "sampler": e.sampler,
        "sampler_steps": diffusion.num_timesteps if e.sampler == "ancestral" else e.steps,
        "eta": e.eta if e.sampler == "ddim" else 1.0,
        "spacing": e.spacing if e.sampler == "ddim" else "all",  # DDIM's timesteps; ancestral: every t
        "variance": diffusion.variance,
        "protocol": recorded_name(cfg),  # paper, "paper, modified" or custom (evaluation/protocol.py)
        **({"protocol_overrides": overridden(cfg)} if overridden(cfg) else {}),
        "precision": e.precision,
        "weights": "ema" if e.use_ema else "raw",
        "step": int(meta["step"]),
        "checkpoint": str(ckpt.resolve()),
        "model_config_hash": meta.get("model_config_hash", ""),
        "kid_subsets": e.kid_subsets,
        "kid_subset_size": e.kid_subset_size,
        "world_size": dist.world_size(),
    }


def evaluate(ckpt: str | Path, overrides: list[str] | tuple[str, ...] = (), *, save_samples_to: str = "",
             out_dir: str = "", log_to_run: bool = True, ema: Any = None,
             weights: dict[str, torch.Tensor] | None = None) -> EvalResult | None:
    """Evaluate one checkpoint (every rank calls this and does its share of sampling, features and bits/dim;
    rank 0 gathers, computes FID/KID, logs and returns the result, the others None).

    ``ema`` (a ``pipeline.checkpoint.weights.EMAChoice``): evaluate that EMA instead of the primary one (its
    ``weights`` when already at hand, e.g. synthesized); its figures go to ``eval/ema/<name>/...`` in MLflow."""

    ckpt = Path(ckpt)
    cfg, meta = read_checkpoint(ckpt, overrides, announce=True)
    if log_to_run:
        logging_target(meta, ckpt, overrides)  # before any work: a server it may not log into is refused now
    e = cfg.eval
    step = int(meta["step"])
    classifier_fits = check_fits(cfg)  # every rank, before any work: a refusal costs nothing
    n = samples_needed(e, classifier_fits, bool(save_samples_to))
    if n != e.num_samples:  # only the grid is made: the provenance and the sampling say how many were drawn
        cfg.eval = e = dataclasses.replace(e, num_samples=n)
    device = _device(e.device)
    diffusion = Diffusion(cfg.diffusion)
    # Weights are read into memory first, so keep-k deleting the folder later does not matter.
    net = load_network(ckpt, cfg, e.use_ema, device, weights=weights, ema=ema.name if ema is not None else "")
    # Every rank: its block of samples and their features, then its share of the held-out batches for
    # bits/dim; rank 0 gathers both. Only then does rank 0 alone load (or compute) the reference
    # statistics, so no rank waits at a collective meanwhile.
    extractor = build_extractor(e, device, instead=_offline_alternative(classifier_fits)) \
        if e.feature_extractor != "none" else None
    bpd_images = _bpd_images(cfg)
    if dist.is_main():
        print(plan(cfg, diffusion, bpd_images, seconds_per_image_call(net, cfg, device)), flush=True)
    # every image to rank 0 only where all are used (saved, or scored by the digits classifier); else the grid's
    keep = None if save_samples_to or classifier_fits else e.grid_images
    images, images_per_s, feats = draw_samples(net, diffusion, cfg, device, features=extractor, keep_images=keep)
    bpd_skip = ""
    est = None
    if e.bpd_split and bpd_images is None:
        bpd_skip = (f"{cfg.data.shards} has no split {e.bpd_split!r} (prepare with --test-fraction 0.1, or set "
                    "eval.bpd_split=train or '')")
    elif e.bpd_split:
        part = bound_per_image(
            net, diffusion, held_out_batches(cfg.data.shards, e.bpd_split, e.bpd_max_images, e.batch_size,
                                             dist.rank(), dist.world_size()),
            timesteps_k=e.bpd_timesteps, device=device, seed=e.seed, progress=dist.is_main(),
        )
        parts = dist.gather_object(part)
        est = summarize_bound(parts) if parts is not None else None
    if not dist.is_main():
        return None
    assert images is not None and (feats is not None or extractor is None)
    out = Path(out_dir) if out_dir else ckpt.parent / "eval" / step_dir_name(step) / (f"ema-{ema.name}" if ema else "")
    out.mkdir(parents=True, exist_ok=True)
    if save_samples_to:
        print(f"samples saved to {save_samples(images, save_samples_to, e.seed)}")

    ext = e.feature_extractor
    metrics = {"eval/sampling_images_per_s": images_per_s}
    ref = None
    if extractor is not None:  # eval.feature_extractor=none: no FID/KID, no reference statistics
        ref = load_reference(e.reference, cfg.data.shards, extractor,
                             cache_dir=e.stats_cache_dir, max_images=e.reference_max_images)
        metrics[f"eval/fid_{ext}"] = fid(feats, ref)
        metrics[f"eval/kid_{ext}"] = kid(feats, ref.feats, num_subsets=e.kid_subsets,
                                         max_subset_size=e.kid_subset_size)
    classifier: dict[str, Any] = {}
    if classifier_fits:
        classifier = digits_net.class_summary(digits_net.predict_proba(images), e.confidence_threshold)
        metrics["eval/digits_confident_share"] = classifier["confident_share"]
    provenance = _provenance(cfg, meta, extractor, ref, ckpt, diffusion)
    if ema is not None:  # which EMA (docs/fid.md, "Sweeping the EMA")
        provenance.update({"ema": ema.name, "ema_kind": ema.kind, "ema_sigma_rel": ema.sigma_rel})
    if bpd_skip:
        # a counted skip, not a failure: FID/KID are still worth having
        provenance["bpd"] = {"skipped": bpd_skip}
        print(f"warning: bits/dim skipped: {bpd_skip}", file=sys.stderr)
    elif est is not None:
        metrics["eval/bpd"], metrics["eval/bpd_se"] = est.bpd, est.bpd_se
        provenance["bpd"] = {"split": e.bpd_split, "num_images": est.num_images,
                             "timesteps_k": e.bpd_timesteps or "exact (all T)"}  # fmt: skip


    shown = images[: e.grid_images]
    _save_png(image_grid(shown, min_width=GRID_MIN_WIDTH), out / SAMPLES_GRID)
    grids = {"samples": str(out / SAMPLES_GRID)}
    real, real_note = real_images(cfg, len(shown))
    (out / REAL_GRID).unlink(missing_ok=True)  # never leave an earlier evaluation's grid beside these samples
    if real is not None:
        _save_png(image_grid(real, min_width=GRID_MIN_WIDTH), out / REAL_GRID)
        grids["real"] = str(out / REAL_GRID)
    else:
        print(f"warning: {REAL_GRID} not written: {real_note}", file=sys.stderr)
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    (out / "metrics.json").write_text(json.dumps({"step": step, **metrics, "classifier": classifier}, indent=1))
    result = EvalResult(step, metrics, provenance, str(out), classifier=classifier, grids=grids,
                        real_grid_note=real_note)
    if log_to_run:
        result.logged_to_run = _log(cfg, meta, ckpt, result, overrides)
    return result


def _device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(path)


def protocol_tags(ext: str, provenance: dict[str, Any]) -> dict[str, str]:
    """The ``fid_protocol.<ext>.*`` tags of docs/tracking.md."""
    keys = ("extractor_sha256", "mode", "reference", "reference_count", "reference_sha256", "num_samples",
            "sampler", "sampler_steps", "eta", "spacing", "precision", "weights", "step", "protocol")  # fmt: skip
    return {f"fid_protocol.{ext}.{k}": str(provenance[k]) for k in keys}


def logging_target(meta: dict, ckpt: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[str | None, str | None]:
    """(run id, tracking URI) of the training run the checkpoint names (meta.json, else the run file beside it).
    A server (http(s)://, databricks, a database URL) recorded there is used only when the user names it too
    (``tracking.uri=`` or $MLFLOW_TRACKING_URI): the figures, and this environment's MLFLOW_TRACKING_*
    credentials, never go to a server a checkpoint from elsewhere chose (EvaluationError)."""
    run_id, uri = meta.get("mlflow_run_id"), meta.get("mlflow_tracking_uri")
    if not run_id:  # saved before its run existed: the training records the run beside its checkpoints too
        recorded = read_run_file(ckpt.parent)
        run_id, uri = (recorded["run_id"], recorded["tracking_uri"]) if recorded else (None, uri)
    if not run_id or not uri:
        return None, None
    named = {o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "tracking.uri"}
    named.add(os.environ.get("MLFLOW_TRACKING_URI", ""))
    local = urlsplit(str(uri)).scheme in ("file", "sqlite") or ("://" not in str(uri)
                                                              and not str(uri).startswith("databricks"))
    if not local and str(uri).rstrip("/") not in {n.rstrip("/") for n in named if n}:
        raise EvaluationError(
            f"{ckpt} names the MLflow run {run_id} on {uri}: evaluate sends its figures (with this environment's "
            f"MLFLOW_TRACKING_* credentials) only to a server you name: add tracking.uri={uri} (or set "
            "MLFLOW_TRACKING_URI) if you trust it, or --no-log"
        )
    return str(run_id), str(uri)


def _log(cfg: Config, meta: dict, ckpt: Path, result: EvalResult,
         overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """Into the training run at the checkpoint's step; returns the run id, or None when nothing was logged."""

    run_id, uri = logging_target(meta, ckpt, overrides)
    if not run_id or not uri:
        print(f"note: {ckpt}/meta.json names no MLflow run (tracking was off); figures are in {result.out_dir}")
        return None
    tracking = dataclasses.replace(cfg.tracking, uri=uri, enabled=True)
    sink = make_sink(tracking, out_dir=ckpt.parent, is_main_process=True, run_id=run_id, attach=True)
    artifact_dir = f"eval/{step_dir_name(result.step)}"
    ema = result.provenance.get("ema")
    if ema is None:
        sink.log_metrics(result.metrics, step=result.step)
        if cfg.eval.feature_extractor != "none":
            sink.set_tags(protocol_tags(cfg.eval.feature_extractor, result.provenance))
    else:  # one EMA of a sweep: its own keys, so the primary EMA's eval/* curve and protocol tags stay as they are
        artifact_dir += f"/ema-{ema}"
        prefix = f"{EMA_METRIC_PREFIX}{ema}/"
        sink.log_metrics({prefix + k.removeprefix("eval/"): v for k, v in result.metrics.items()}
                         | {f"{prefix}sigma_rel": result.provenance["ema_sigma_rel"]}, step=result.step)
        tags = {f"ema_sweep.{ema}.kind": result.provenance["ema_kind"]}
        if cfg.eval.feature_extractor != "none":
            tags |= {"ema_sweep." + k: v for k, v in protocol_tags(cfg.eval.feature_extractor,
                                                                     result.provenance).items()}
        sink.set_tags(tags)
    for path in result.grids.values():
        sink.log_artifact(path, artifact_path=artifact_dir)
    sink.log_artifact(text=json.dumps(result.provenance, indent=1, sort_keys=True), name="provenance.json",
                      artifact_path=artifact_dir)
    sink.finish("FINISHED")  # attach=True: flushes only; the training run's status is left alone
    if sink.stats.get("dropped_ops"):
        print(f"warning: {sink.stats['dropped_ops']} tracking calls to {uri} were dropped (see warnings above); "
              f"the figures are also in {result.out_dir}", file=sys.stderr)
        return None
    if sink.experiment_id is not None:
        result.mlflow_ui = ui_hint(uri, sink.experiment_id, run_id)
    return run_id


def format_result(r: EvalResult) -> str:
    p = r.provenance
    ext = p["extractor"]
    spacing = f" ({p['spacing']})" if p.get("sampler") == "ddim" else ""
    weights = f"EMA {p['ema']}" if p.get("ema") else f"{p['weights']} weights"
    lines = [f"step {r.step}  ({weights}, {p['sampler']} {p['sampler_steps']} steps{spacing}, eta "
             f"{p['eta']}, {p['num_samples']} samples, seeds {p['seeds']}; protocol {p.get('protocol', 'custom')})"]
    for k, v in sorted(r.metrics.items()):
        lines.append(f"  {k:32s} {v:.6g}")
    if ext == "none":
        lines.append("  FID/KID: not computed (eval.feature_extractor=none)")
    else:
        lines.append(f"  FID/KID features: {ext} (weights sha256 {p['extractor_sha256'][:12]}), {p['resize']}")
        lines.append(f"  reference: {p['reference']} ({p['reference_count']} images, stats sha256 "
                     f"{p['reference_sha256'][:12]})")
    if ext.startswith("digits"):
        lines.append("  note: digits-feature FID, not Inception FID; not comparable with published numbers")
    if r.classifier:
        lines.append(f"  digits classifier: {r.classifier['confident_share']:.3f} of samples labelled with "
                     f"confidence >= {r.classifier['threshold']}; classes {r.classifier['class_histogram']}")
    if r.grids:
        real = f"{REAL_GRID}: {r.real_grid_note}" if "real" in r.grids else f"no {REAL_GRID} ({r.real_grid_note})"
        lines.append(f"  grids: {SAMPLES_GRID}: samples; {real}")
    lines.append(f"  logged to MLflow run {r.logged_to_run}" if r.logged_to_run else "  not logged to MLflow")
    if r.mlflow_ui:
        lines.append("  " + r.mlflow_ui.replace("\n", "\n  "))
    lines.append(f"  files: {r.out_dir}")
    return "\n".join(lines)


def _checkpoint_arg(arg: str) -> Path:
    """The checkpoint ``--checkpoint`` names (a run folder: its newest complete one), decided by rank 0 for all."""
    decision: tuple[str, str, str] = ("", "", "")
    if dist.is_main():
        try:
            path, note = checkpoint_of(arg)
            decision = ("ok", str(path), note)
        except EvaluationError as exc:
            decision = ("error", str(exc), "")
    kind, value, note = dist.broadcast_object(decision)
    if kind == "error":
        raise EvaluationError(value)
    if note and dist.is_main():
        print(note, flush=True)
    return Path(value)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m evaluation.evaluate", __doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a complete out_dir/step-NNNNNNNN folder, or a run folder (out_dir): "
                                           "its newest complete checkpoint")
    what.add_argument("--watch", help="a training out_dir: evaluate each new complete checkpoint once")
    p.add_argument("--save-samples", default="", help="write the samples: DIR (PNGs named by seed) or FILE.npz (default: not written)")
    p.add_argument("--out", default="", help="figures folder (default: <out_dir>/eval/step-NNNNNNNN)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log into the training run (default: log into the MLflow run meta.json names)")
    p.add_argument("--poll-s", type=float, default=60.0, help="--watch: seconds between scans of the folder")
    p.add_argument("--ledger", default="",
                   help="--watch: ledger file (default: <DIR>/eval/ledger.json), a summary; the records and claims "
                        "are in the folder beside it (ledger.d/); watchers with the same ledger share the work")
    p.add_argument("--once", action="store_true",
                   help="--watch: one scan, evaluate what is there and not claimed by another watcher, exit")
    p.add_argument("--max-wait-s", type=float, default=0.0,
                   help="--watch: stop (exit 3) after this long without a new record by any watcher, while "
                        "TRAINING_DONE is missing or other watchers hold the checkpoints left (0 = wait for ever)")
    p.add_argument("--claim-stale-s", type=float, default=DEFAULT_CLAIM_STALE_S,
                   help="--watch: take over another watcher's claim on a checkpoint when its heartbeat is older "
                        "than this (that watcher was killed); the owner beats every 1/6 of it; keep it well "
                        "above the clock differences between hosts (default: %(default)g)")
    p.add_argument("--ema", default="",
                   help="--checkpoint: evaluate these EMAs instead of the primary one: all (every EMA the checkpoint "
                        "stores) or NAME[,NAME] (decay<d>, sigma<s>; a sigma<x> not stored is synthesized), each "
                        "logged as eval/ema/<NAME>/... (docs/fid.md)")
    p.add_argument("--posthoc-sigma-rels", default="",
                   help="--checkpoint: also synthesize the post-hoc EMAs of these sigma_rels from the checkpoint's "
                        "power-EMA snapshots and evaluate each: LO:HI:N (N values spaced geometrically) or A,B,...")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config.yaml, e.g. eval.num_samples=1000 "
                        "(default: none; the eval.* section the training was run with applies)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _init_distributed()
    return cli.run("evaluate", lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
    if a.watch and (a.ema or a.posthoc_sigma_rels):
        raise EvaluationError("--ema and --posthoc-sigma-rels evaluate one checkpoint: use --checkpoint (the "
                              "watcher evaluates the primary EMA of each new checkpoint)")
    if a.watch:
        return _watch(a)
    if a.ema or a.posthoc_sigma_rels:
        _sweep(a)
        dist.shutdown()
        return 0
    r = evaluate(_checkpoint_arg(a.checkpoint), a.overrides, save_samples_to=a.save_samples, out_dir=a.out,
                 log_to_run=not a.no_log)
    if r is not None:
        print(format_result(r))
    dist.shutdown()  # an orderly teardown of the process groups (no collective follows)
    return 0


def _sweep(a: argparse.Namespace) -> list[tuple[Any, EvalResult]]:
    """--ema / --posthoc-sigma-rels: evaluate each chosen EMA of one checkpoint (every rank), then print the FID
    against the EMA length (rank 0). Post-hoc EMAs are synthesized first, in one pass over the snapshots. With
    more than one EMA, bits/dim is left out (eval.bpd_split=''): it does not choose the EMA, and costs as much as
    the sampling; evaluate the chosen one with --ema NAME for it."""

    ckpt = _checkpoint_arg(a.checkpoint)
    try:
        sigma_rels = posthoc.parse_sigma_rels(a.posthoc_sigma_rels) if a.posthoc_sigma_rels else []
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    chosen = choices(open_checkpoint(ckpt), a.ema, sigma_rels)
    if a.save_samples and len(chosen) > 1:
        raise EvaluationError("--save-samples writes the samples of one EMA; give one --ema NAME with it")
    synthesized = posthoc.synthesize(open_checkpoint(ckpt), [c.sigma_rel for c in chosen if c.kind == "posthoc"]
                                         ) if any(c.kind == "posthoc" for c in chosen) else {}
    overrides = [*a.overrides, *(["eval.bpd_split=''"] if len(chosen) > 1 else [])]
    results = []
    for c in chosen:
        if dist.is_main():
            print(f"--- EMA {c.name} ({c.kind}, sigma_rel {c.sigma_rel:.4g}; {c.source})", flush=True)
        r = evaluate(ckpt, overrides, save_samples_to=a.save_samples, out_dir=a.out and str(Path(a.out) / f"ema-{c.name}"),
                     log_to_run=not a.no_log, ema=c, weights=synthesized.pop(c.name, None))
        if r is not None:
            print(format_result(r), flush=True)
            results.append((c, r))
    if results:
        print(format_sweep(results))
    return results


def format_sweep(results: list[tuple[Any, EvalResult]]) -> str:
    """The FID against the EMA length (sigma_rel), shortest first, and the best EMA."""
    ext = results[0][1].provenance["extractor"]
    key = next((k for k in results[0][1].metrics if k.startswith("eval/fid_")), None)
    rows = sorted(results, key=lambda cr: cr[0].sigma_rel)
    lines = [f"FID vs EMA length, step {results[0][1].step} ({ext}):", f"  {'ema':14s} {'kind':8s} {'sigma_rel':>9s}"
             + (f"  {key.removeprefix('eval/'):>12s}" if key else "")]
    for c, r in rows:
        lines.append(f"  {c.name:14s} {c.kind:8s} {c.sigma_rel:9.4f}" + (f"  {r.metrics[key]:12.4f}" if key else ""))
    if key:
        c, r = min(rows, key=lambda cr: cr[1].metrics[key])
        lines.append(f"best: {c.name} (sigma_rel {c.sigma_rel:.4g}, {c.kind}): {key.removeprefix('eval/')} "
                     f"{r.metrics[key]:.4f}; evaluate it with --ema {c.name}, export it with "
                     f"python -m evaluation.export CHECKPOINT --diffusers OUT --weights {c.name}")
    return "\n".join(lines)


def _watch(a: argparse.Namespace) -> int:
    """--watch: evaluate each new checkpoint once, with any number of watchers; exit 3 if it gave up."""
    if dist.world_size() > 1:
        raise EvaluationError("--watch runs in one process (several watchers share an out_dir by themselves); "
                              "launch each without accelerate")
    # The MLflow logging is the watcher's report step, apart from the evaluation: it runs only once the
    # watcher has checked that its claim still holds, so a watcher that lost it never logs a second FID.
    read: dict[int, tuple[Path, Config, dict]] = {}

    def evaluate_fn(ckpt: Path) -> EvalResult | None:
        cfg, meta = read_checkpoint(ckpt, a.overrides)  # now: keep-k may delete the folder before the report
        if not a.no_log:
            logging_target(meta, ckpt, a.overrides)
        read[int(meta["step"])] = (ckpt, cfg, meta)
        return evaluate(ckpt, a.overrides, log_to_run=False)

    def report_fn(r: EvalResult) -> None:
        ckpt, cfg, meta = read.pop(r.step)
        if not a.no_log:
            r.logged_to_run = _log(cfg, meta, ckpt, r, a.overrides)
        print(format_result(r), flush=True)

    stopped = watch(a.watch, evaluate_fn, report_fn=report_fn, poll_s=a.poll_s, ledger=a.ledger, once=a.once,
                    max_wait_s=a.max_wait_s, claim_stale_s=a.claim_stale_s)
    if stopped.reason is StopReason.GAVE_UP:
        # say so in the exit status: a job chained on the watcher must not go on
        if stopped.training_done:
            print(f"evaluate: the watcher stopped after --max-wait-s while other watchers still held "
                  f"{', '.join(stopped.waiting_on)}; they record them, or a watcher started again takes them "
                  "over once their claims are older than --claim-stale-s", file=sys.stderr)
        else:
            print(f"evaluate: the watcher stopped before {a.watch}/{DONE} appeared, after "
                  f"{len(stopped.ledger['checkpoints'])} checkpoint(s); did the training fail or stall?",
                  file=sys.stderr)
        return cli.EXIT_PARTIAL
    return 0


def _init_distributed() -> None:
    """Under torchrun/accelerate launch: one process group (gloo on CPU, NCCL on GPUs) plus a gloo group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():

        backend = "nccl" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") != "1" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist.local_rank())
        tdist.init_process_group(backend)
        dist.init_flag_group()


if __name__ == "__main__":
    raise SystemExit(main())
