"""A shard's samples as positioned raw samples, and their decoding, under the corruption policy.

Reading yields one Raw per position of the split, so positions stay aligned whatever fails: an
unreadable sample is a placeholder (parts None) carrying the failure, counted when it is emitted
(pipeline.data.report). Decoding a Raw gives the uint8 image and label, or None for a skipped one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.decode import decode_image
from pipeline.data.manifest import Shard
from pipeline.data.report import Report
from pipeline.data.shards import ShardSet
from pipeline.data.tar import READ_ERRORS, tar_samples


@dataclass
class Raw:
    key: str
    parts: dict[str, bytes] | None  # None = unreadable (truncated or missing shard)
    index: int  # sample index within the split (manifest order); -1 where unknown
    shard: str
    # a shard read failed here: the message is warned, and the shard counted, when this slot is emitted
    # (emission is once per position, also across resume; reading is not: a resumed block is re-read)
    failure: str = ""
    lost: bool = True  # with parts None: a lost sample (False: only a failure marker, no sample behind it)


def read_piece(shard: Shard, base: int, lo: int, hi: int, report: Report,
               members: frozenset[str] = frozenset()) -> Iterator[Raw]:
    """Samples lo..hi-1 of one shard; unreadable ones come out as placeholders so positions stay aligned.

    A shard that fails at its sample k is counted once per epoch over all ranks and workers: by the
    stream whose piece holds sample k (lo <= k < hi). Streams whose piece starts after k count only
    their lost samples.
    """
    k, last_key = 0, None
    try:
        for key, parts in tar_samples(shard.url, members):
            if k >= lo:
                yield Raw(key, parts, base + k, shard.url)
            k, last_key = k + 1, key
            if k >= hi:
                return  # read no further: what lies after this piece is another stream's
        exc: BaseException = EOFError(f"the tar holds {k} samples, the manifest says {shard.num_samples}")
    except READ_ERRORS as e:
        exc = e
    first = max(k, lo)
    lost = f"its samples {k}..{shard.num_samples - 1} ({shard.num_samples - k} of {shard.num_samples})"
    note = report.shard_failed(shard, last_key, exc, lost) if k >= lo or report.strict else ""
    for j in range(first, hi):
        yield Raw(f"#{j}", None, base + j, shard.url, failure=note if j == first else "")


def read_all(shard: Shard, report: Report, base: int = -1) -> list[Raw]:
    """A whole shard of unknown size; a failure becomes a marker slot (counted once, when emitted).

    Indices are base, base + 1, ... when `base` >= 0, else -1 (unknown).
    """
    out: list[Raw] = []
    last = None
    try:
        for key, parts in tar_samples(shard.url):
            out.append(Raw(key, parts, base + len(out) if base >= 0 else -1, shard.url))
            last = key
    except READ_ERRORS as exc:
        note = report.shard_failed(shard, last, exc, "the rest of it (its size is unknown without a manifest)")
        out.append(Raw("", None, -1, shard.url, failure=note, lost=False))
    return out


def decode_sample(raw: Raw, shardset: ShardSet, report: Report) -> tuple[np.ndarray, int] | None:
    """(uint8 (H, W, C) image, label or -1), or None for a lost or undecodable sample (counted in `report`)."""
    if raw.parts is None:
        report.emitted(raw)  # counts a lost sample, and a shard failure on its first one
        return None
    try:
        image = decode_image(raw.parts, shardset.image_size, shardset.channels, shardset.encoding)
        label = int(raw.parts["cls"]) if "cls" in raw.parts else -1
    except Exception as exc:
        report.sample_failed(raw, f"cannot decode ({type(exc).__name__}: {exc})")
        return None
    return image, label
