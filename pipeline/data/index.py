"""prepare's sample index: every sample's byte range and sha256 in its shard, so a stream reads only its piece.

One file per split beside manifest.json, `<split>-index.safetensors`, named in the manifest's split entry
with its own sha256 (`"index": {"name": ..., "sha256": ...}`): the manifest's hash covers the index, and
the index covers every byte of every shard. Per shard (safetensors, no pickle):

    "<shard name>/offsets"   int64 (n + 1,)  byte offset of sample k's first tar header; offsets[n] = file size
    "<shard name>/sha256"    uint8 (n, 32)   sha256 of the shard's bytes [offsets[k], offsets[k + 1])

The samples' ranges tile the whole file: the last one also holds tar's end-of-archive blocks and its
record padding. So the pieces of one epoch, read by any number of streams, read each byte of a shard
exactly once, and every byte that is read is checked (docs/data.md, "Verification").
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from pipeline.data.manifest import ManifestError
from pipeline.files import INDEX_HEADER_MAX_BYTES, safetensors_header_problem

INDEX_FORMAT = "1"
DIGEST_BYTES = 32


def index_name(split: str) -> str:
    return f"{split}-index.safetensors"


@dataclass(frozen=True)
class ShardIndex:
    offsets: np.ndarray  # int64 (n + 1,): sample k's bytes are [offsets[k], offsets[k + 1]); offsets[n] = file size
    digests: np.ndarray  # uint8 (n, 32): sha256 of those bytes

    @property
    def size(self) -> int:
        return int(self.offsets[-1])


def shard_index(path: str, first_offsets: list[int]) -> tuple[ShardIndex, str]:
    """(index, sha256 of the whole file) of a tar prepare has just written, given each sample's first
    header offset; one read of the file, one sample in memory at a time."""
    offsets = np.array([*first_offsets, os.path.getsize(path)], dtype=np.int64)
    whole, digests = hashlib.sha256(), bytearray()
    with open(path, "rb") as f:
        if offsets[0]:
            whole.update(f.read(int(offsets[0])))
        for a, b in zip(offsets[:-1], offsets[1:]):
            data = f.read(int(b - a))
            whole.update(data)
            digests += hashlib.sha256(data).digest()
    return ShardIndex(offsets, np.frombuffer(bytes(digests), np.uint8).reshape(-1, DIGEST_BYTES)), whole.hexdigest()


def first_offsets(path: str) -> list[int]:
    """Each sample's first header offset in a tar (for indexing shards that were written without one)."""
    out, key = [], None
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            k = m.name.rsplit("/", 1)[-1].partition(".")[0]
            if k != key:
                out.append(m.offset)
                key = k
    return out


def encode(indexes: dict[str, ShardIndex]) -> bytes:
    """The index file of a split (byte-identical for the same shards: safetensors orders its header)."""

    tensors = {}
    for name, ix in indexes.items():
        tensors[f"{name}/offsets"] = np.ascontiguousarray(ix.offsets, dtype=np.int64)
        tensors[f"{name}/sha256"] = np.ascontiguousarray(ix.digests, dtype=np.uint8)
    return save(tensors, metadata={"format": INDEX_FORMAT})


def decode(data: bytes, counts: dict[str, int], where: str) -> dict[str, ShardIndex]:
    """The shards' indexes from an index file's bytes (already checked against the manifest's sha256),
    each validated against the manifest's sample count; anything else is a ManifestError naming `where`."""
    problem = safetensors_header_problem(data[:8], len(data), INDEX_HEADER_MAX_BYTES, "sample index")
    if problem:
        raise ManifestError(f"sample index {where} {problem}; re-run prepare")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ManifestError(f"sample index {where} does not parse ({exc}); re-run prepare") from exc
    out = {}
    for name, n in counts.items():
        offsets, digests = tensors.get(f"{name}/offsets"), tensors.get(f"{name}/sha256")
        if offsets is None or digests is None:
            raise ManifestError(f"sample index {where} has no entry for shard {name}; re-run prepare")
        offsets = offsets.astype(np.int64)
        if (offsets.shape != (n + 1,) or digests.shape != (n, DIGEST_BYTES) or offsets[0] != 0
                or (n and not (np.diff(offsets) > 0).all())):
            raise ManifestError(f"sample index {where}: the entry of shard {name} does not describe its {n} samples "
                                f"(offsets {offsets.shape}, digests {digests.shape}); re-run prepare")
        out[name] = ShardIndex(offsets, digests)
    return out
