"""FID and KID with clean-fid's code, and reference statistics with their provenance.

The distances are clean-fid's (``frechet_distance``, ``kernel_distance``); what is ours is where the
reference features come from and how they are cached:

- from the data set's shards (``eval.reference = "train"`` or ``"test"``): every image of that split, in
  manifest order, read and decoded by the training loader's code (the trainer's pixels, bit for bit),
  through the chosen extractor; cached as ``.npz`` under a key made of the manifest's SHA-256, the
  split, the extractor (name + weights hash) and the clean-fid mode, so changed shards or another
  extractor never reuse stale statistics;
- clean-fid's named statistics (``eval.reference = "clean-fid:cifar10/train/32"``), downloaded by
  clean-fid (Inception only): the protocol that compares with published numbers (docs/fid.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cleanfid import fid as cleanfid_fid
from cleanfid.features import get_reference_statistics

from evaluation.features import INCEPTION_NAME, FeatureExtractor
from pipeline.cli import InputError
from pipeline.data.manifest import Manifest, is_url, read_manifest
from pipeline.data.sequential import iter_split

CLEANFID_PREFIX = "clean-fid:"
STATS_FORMAT = 1


class ReferenceStatsError(ValueError, InputError):
    """Reference statistics that cannot be made or loaded (bad spec, missing split, offline download)."""


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None  # features for KID (clean-fid stores them beside the named statistics too)
    provenance: dict = field(default_factory=dict)  # source, name, split, count, sha256
    cache_path: str = ""
    from_cache: bool = False

    @property
    def stats_sha256(self) -> str:
        """Hash of (mu, sigma) as float64: two references with this hash give the same FID."""
        h = hashlib.sha256(np.ascontiguousarray(self.mu, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.sigma, dtype=np.float64).tobytes())
        return h.hexdigest()


def stats_of(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance, as clean-fid computes them (np.mean, np.cov rowvar=False)."""
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance; got shape {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid(feats: np.ndarray, ref: ReferenceStats) -> float:
    """Fréchet distance between the Gaussian fitted to ``feats`` and the reference (clean-fid's formula)."""
    mu, sigma = stats_of(feats)
    if mu.shape != ref.mu.shape:
        raise ValueError(
            f"feature dimension {mu.shape[0]} differs from the reference statistics' {ref.mu.shape[0]}: "
            "they were made with another feature extractor"
        )
    with warnings.catch_warnings():  # clean-fid 0.1.35 passes sqrtm's deprecated disp= (SciPy >= 1.16)
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(cleanfid_fid.frechet_distance(mu, sigma, ref.mu, ref.sigma))


def kid(feats: np.ndarray, ref_feats: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """clean-fid's KID (unbiased MMD² with the cubic polynomial kernel, averaged over random subsets).

    clean-fid draws the subsets from numpy's global generator; we seed it for a reproducible value and
    put the caller's state back.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid_fid.kernel_distance(ref_feats, feats, num_subsets=num_subsets,
                                                  max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------------------------- shards


def load_split_images(manifest: Manifest, split: str, max_images: int = 0) -> np.ndarray:
    """uint8 (N, C, H, W): every image of a split once (the first ``max_images`` when > 0), in manifest order.

    Read by the training loader's own reader and decoder, unshuffled and unflipped
    (pipeline.data.sequential), so the statistics are of the pixels the model is trained on; a corrupt
    shard or sample is skipped with a CorruptDataWarning, as in training.
    """
    images = [sample.image for sample in iter_split(manifest, split, max_images)]
    if not images:
        raise ReferenceStatsError(f"split {split!r} of {manifest.location} holds no images")
    return np.stack(images)


def _manifest_sha256(manifest: Manifest) -> str:
    # the manifest lists every shard's sha256, so re-prepared shards give a new hash
    return hashlib.sha256(json.dumps(manifest.raw, sort_keys=True).encode()).hexdigest()


def default_cache_dir(manifest: Manifest) -> Path:
    """<shards>/fid_stats for local shards (shared by every job that reads them), else ~/.cache/ddpm-pipeline."""
    if not is_url(manifest.location) and os.access(manifest.location, os.W_OK):
        return Path(manifest.location) / "fid_stats"
    return Path(os.path.expanduser("~/.cache/ddpm-pipeline/fid_stats"))


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # concurrent evaluators of the same shards never see a half-written file


def reference_from_shards(
    shards: str, split: str, extractor: FeatureExtractor, *, cache_dir: str = "", max_images: int = 0
) -> ReferenceStats:
    """Statistics of a split of the prepared data, from the cache when the key matches."""
    manifest = read_manifest(shards)
    manifest.shards(split)  # a clear error naming the available splits
    manifest_sha = _manifest_sha256(manifest)
    key_fields = {
        "format": STATS_FORMAT, "manifest_sha256": manifest_sha, "split": split, "extractor": extractor.name,
        "weights_sha256": extractor.weights_sha256, "mode": extractor.fid_mode, "max_images": max_images,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(manifest)
    path = folder / f"{split}-{extractor.name}-{extractor.fid_mode}-{key}.npz"
    provenance = {
        "source": "shards", "location": manifest.location, "split": split,
        "manifest_sha256": manifest_sha, "key": key,
    }  # fmt: skip
    if path.is_file():
        with np.load(path) as z:
            feats = z["feats"]
            mu, sigma = z["mu"], z["sigma"]
        return ReferenceStats(mu, sigma, feats, {**provenance, "count": len(feats)}, str(path), from_cache=True)
    images = load_split_images(manifest, split, max_images)
    feats = extractor(images, desc=f"reference {split}")
    mu, sigma = stats_of(feats)
    _save_npz(path, mu=mu, sigma=sigma, feats=feats.astype(np.float32), key=json.dumps(key_fields))
    return ReferenceStats(mu, sigma, feats.astype(np.float32), {**provenance, "count": len(feats)}, str(path))


def parse_cleanfid_spec(spec: str) -> tuple[str, str, str]:
    """``clean-fid:cifar10/train/32`` → (name, split, resolution)."""
    parts = spec[len(CLEANFID_PREFIX):].split("/")
    if len(parts) != 3 or not all(parts):
        raise ReferenceStatsError(
            f"eval.reference={spec!r}: write clean-fid statistics as clean-fid:<dataset>/<split>/<resolution>, "
            "e.g. clean-fid:cifar10/train/32 (the paper's protocol, with eval.fid_mode=legacy_tensorflow)"
        )
    return parts[0], parts[1], parts[2]


def reference_from_cleanfid(spec: str, extractor: FeatureExtractor) -> ReferenceStats:
    """clean-fid's precomputed statistics (and KID features) for a named data set, Inception features only."""
    name, split, res = parse_cleanfid_spec(spec)
    if extractor.name != INCEPTION_NAME:
        raise ReferenceStatsError(
            f"eval.reference={spec!r} holds InceptionV3 statistics; they cannot be compared with "
            f"{extractor.name} features. Use eval.feature_extractor=inception, or a shard split as reference"
        )
    try:
        mu, sigma = get_reference_statistics(name, res, mode=extractor.fid_mode, split=split, metric="FID")
        ref_feats = get_reference_statistics(name, res, mode=extractor.fid_mode, split=split, metric="KID")
    except urllib.error.HTTPError as exc:
        raise ReferenceStatsError(
            f"clean-fid has no statistics for {name}/{split}/{res} in mode {extractor.fid_mode} ({exc}); "
            "see clean-fid's README for the list"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        # clean-fid imports torchvision (~4 s): only the processes that compute FID pay it
        import cleanfid

        folder = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
        fname = f"{name}_{extractor.fid_mode}_{split}_{res}.npz".lower()
        raise ReferenceStatsError(
            f"clean-fid statistics {fname} (and its _kid.npz) could not be downloaded from "
            f"https://www.cs.cmu.edu/~clean-fid/stats/ ({getattr(exc, 'reason', exc)}); download them elsewhere "
            f"and put them in {folder}"
        ) from exc
    provenance = {"source": "clean-fid", "name": name, "split": split, "resolution": res, "count": len(ref_feats)}
    return ReferenceStats(mu, sigma, ref_feats, provenance)


def load_reference(spec: str, shards: str, extractor: FeatureExtractor, *, cache_dir: str = "",
                   max_images: int = 0) -> ReferenceStats:
    """``eval.reference``: a split name of the data shards, or ``clean-fid:<dataset>/<split>/<res>``."""
    if spec.startswith(CLEANFID_PREFIX):
        return reference_from_cleanfid(spec, extractor)
    if not shards:
        raise ReferenceStatsError(
            f"eval.reference={spec!r} is a split of the data shards but data.shards is not set; "
            "pass data.shards=DIR or a clean-fid:<dataset>/<split>/<res> reference"
        )
    return reference_from_shards(shards, spec, extractor, cache_dir=cache_dir, max_images=max_images)
