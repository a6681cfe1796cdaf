"""The evaluation read: every sample of a split once, in manifest order, unshuffled and unflipped.

    for index, key, image, label in iter_split("data/cifar10", "train"):   # image: uint8 (C, H, W)
        ...
    for batch in split_batches("data/cifar10", "test", 100, rank=r, world_size=w):
        batch["image"]                                                      # float32 (B, C, H, W) in [-1, 1]

It is the training loader's path without its shuffle, flips and workers: the same tar reader
(pipeline.data.tar), positions (pipeline.data.samples), decoder and scaling (pipeline.data.decode) and
corruption policy (pipeline.data.report: a corrupt shard or sample is counted and skipped with a
CorruptDataWarning, or raises with a strict Report). Every shard is read whole, so every shard with a
manifest sha256 is verified as in data.verify=stream (sample by sample against prepare's index, or as a
whole file for shards prepared before it), and none of its samples is yielded before that.
So FID reference statistics and held-out bits/dim see exactly the pixels the trainer sees, and `index`
is the sample's position in the split, as in the loader's batch["index"].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from pipeline.data.decode import to_unit_range
from pipeline.data.manifest import Manifest
from pipeline.data.report import Report
from pipeline.data.samples import Raw, decode_sample, read_all, read_piece
from pipeline.data.shards import (
    ShardSet,
    attach_index,
    check_shards,
    from_manifest,
    resolve_shards,
    start_verification,
)


class SplitSample(NamedTuple):
    index: int  # position in the split (manifest order): the loader's batch["index"] of this sample
    key: str  # the sample's key in its shard
    image: np.ndarray  # uint8 (C, H, W), C-contiguous
    label: int  # -1 where unlabelled


def _shardset(shards: str | Manifest, split: str) -> ShardSet:
    if isinstance(shards, Manifest):
        return from_manifest(shards, shards.shards(split), shards.location)
    return resolve_shards(shards, split, need_counts=False)


def _raws(shardset: ShardSet, report: Report) -> Iterator[Raw]:
    """Every position of the split in manifest order: shards in order, samples in tar order."""
    base = 0
    for shard in shardset.shards:
        if shard.num_samples >= 0:  # lost samples keep their positions, as in the loader
            yield from read_piece(shard, base, 0, shard.num_samples, report, shardset)
            base += shard.num_samples
        else:  # no manifest: positions run over the samples read
            raws = read_all(shard, report, base)
            yield from raws
            base += sum(r.parts is not None for r in raws)


def iter_split(shards: str | Manifest, split: str, max_images: int = 0,
               report: Report | None = None) -> Iterator[SplitSample]:
    """Every readable sample of a split once (the first `max_images` when > 0), in manifest order.

    `shards` is what data.shards accepts (a prepared folder, its manifest.json, a pattern or URLs) or a
    read Manifest. Skips are counted in `report` (default: a fresh non-strict one; Report(strict=True)
    raises CorruptDataError instead).
    """
    shardset = _shardset(shards, split)
    check_shards(shardset.shards, shardset.source)
    report = report if report is not None else Report(strict=False)
    start_verification(shardset, "stream", report.strict)  # every shard is read whole: hashed as it is read
    attach_index(shardset)  # with the index, every sample's bytes are checked against their own sha256
    count, shape = 0, None
    for raw in _raws(shardset, report):
        got = decode_sample(raw, shardset, report)
        if got is None:
            continue
        image, label = got
        if shape is None:
            shape = image.shape
        elif image.shape != shape:  # the loader refuses these from a batch; here, from the split
            report.sample_failed(raw, f"image shape {image.shape} differs from the split's (H, W, C) {shape}")
            continue
        yield SplitSample(raw.index, raw.key, np.array(image.transpose(2, 0, 1), order="C"), label)
        count += 1
        if count == max_images:
            return


def split_batches(shards: str | Manifest, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  max_images: int = 0, report: Report | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """iter_split's samples in batches {"image": float32 (b, C, H, W) in [-1, 1], "label", "index": int64 (b,)},
    scaled exactly as the loader scales them; the last batch may be smaller.

    With world_size > 1, batch k goes to rank k mod world_size; every rank reads the whole split, so the
    batches are the same whichever rank forms them.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")

    def batch(samples: list[SplitSample]) -> dict[str, torch.Tensor]:
        image = torch.empty((len(samples), *samples[0].image.shape), dtype=torch.float32)
        out = image.numpy()
        for i, s in enumerate(samples):
            to_unit_range(s.image, out[i])
        return {"image": image, "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
                "index": torch.tensor([s.index for s in samples], dtype=torch.int64)}

    buf: list[SplitSample] = []
    k = 0  # batch number
    for sample in iter_split(shards, split, max_images, report):
        buf.append(sample)
        if len(buf) == batch_size:
            if k % world_size == rank:
                yield batch(buf)
            buf, k = [], k + 1
    if buf and k % world_size == rank:
        yield batch(buf)
