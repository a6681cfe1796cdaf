"""Damaging real shards the ways storage, copies and people do: bytes, headers, members, whole samples."""

from __future__ import annotations

import io
import tarfile

import numpy as np

from pipeline.data.plan import Plan
from pipeline.data.sequential import iter_split


def read_bytes(path: str) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def fix_checksum(data: bytearray, header_at: int) -> None:
    """Recompute a tar header's checksum after editing it (so only the edited field is wrong)."""
    header = data[header_at:header_at + 512]
    header[148:156] = b" " * 8
    data[header_at + 148:header_at + 156] = b"%06o\0 " % sum(header)


def set_size_field(path: str, header_at: int, field: bytes, checksum: bool = True) -> None:
    """Overwrite the 12-byte size field of the header at `header_at` (by default with a valid checksum)."""
    assert len(field) == 12
    data = read_bytes(path)
    data[header_at + 124:header_at + 136] = field
    if checksum:
        fix_checksum(data, header_at)
    write_bytes(path, data)


def base256(value: int) -> bytes:
    """A 12-byte size field in GNU base-256 (0x80, then 11 big-endian bytes: at most 2**88 - 1)."""
    return b"\x80" + value.to_bytes(11, "big")


def members(path: str) -> list[tuple[str, bytes]]:
    """(name, data) of every member of a tar, in order."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_members(path: str, items: list[tuple[str, bytes]]) -> None:
    """A ustar tar of (name, data) pairs, written as prepare writes its shards."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))


def pax_header(records: bytes) -> bytes:
    """A pax extended header member ('x') carrying `records` verbatim, padded to whole blocks."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def reference(folder: str, split: str = "train") -> dict[int, tuple[str, np.ndarray, int]]:
    """index -> (key, uint8 (C, H, W), label) of an intact prepared split, read once (manifest order)."""
    return {s.index: (s.key, s.image, s.label) for s in iter_split(folder, split)}


def checks_passed(loader, shard: int) -> int:
    """How many checks of `shard` a loader's streams have emitted: in each epoch, the slot of the shard's last
    sample in the piece that ends there. Needs shuffle_buffer=0 (slots then come in read order)."""
    counts = [s.num_samples for s in loader.shardset.shards]
    plan = Plan(counts, loader.batch_size, loader.world_size, loader.K, loader.cfg.seed)
    n = 0
    for worker, (epoch, slot) in enumerate(loader.state_dict()["cursors"]):
        for e in range(epoch + 1):
            start, length = plan.slice(e, worker * loader.world_size + loader.rank)
            done = 0
            for i, _, lo, hi in plan.pieces(e, start, start + length):
                done += hi - lo
                n += i == shard and hi == counts[i] and (e < epoch or done <= slot)
    return n


def unverified(loader) -> set[int]:
    """Positions a loader's streams read in pieces that end before their shard's end (read unverified)."""
    counts = [s.num_samples for s in loader.shardset.shards]
    plan = Plan(counts, loader.batch_size, loader.world_size, loader.K, loader.cfg.seed)
    out = set()
    for worker, (epoch, _) in enumerate(loader.state_dict()["cursors"]):
        for e in range(epoch + 1):
            start, length = plan.slice(e, worker * loader.world_size + loader.rank)
            out |= {base + j for i, base, lo, hi in plan.pieces(e, start, start + length) if hi < counts[i]
                    for j in range(lo, hi)}
    return out


def drain(loader, n_batches: int) -> tuple[list[tuple[int, np.ndarray, int]], dict, list[str]]:
    """(delivered (split index, image HWC uint8, label) triples, stats after the last batch, the texts of the
    CorruptDataWarnings raised meanwhile)."""
    import warnings

    from pipeline.data.report import CorruptDataWarning
    from tests.helpers.data import to_u8

    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(loader)
        for _ in range(n_batches):
            b = next(it)
            out += zip(b["index"].tolist(), to_u8(b["image"]), b["label"].tolist())
        it.close()
    return out, dict(loader.stats), [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
