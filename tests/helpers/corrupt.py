"""Damaging real shards the ways storage, copies and people do: bytes, headers, members, whole samples."""

from __future__ import annotations

import io
import tarfile

import numpy as np

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


def stream_runs(loader):
    """(shard, lo, hi, passed) for every read (a run of consecutive samples, pipeline.data.plan.Group.runs) of a
    loader's streams in the groups up to their cursors; passed: the slot of the run's last sample is behind the
    cursor (a read's check is counted on that slot)."""
    plan = loader.plan
    for worker, (n,) in enumerate(loader.state_dict()["cursors"]):
        for g in plan.groups(worker * loader.world_size + loader.rank, 0):
            if g.n0 >= n:
                break
            slot = {int(x): g.n0 + j for j, x in enumerate(g.samples)}
            for i, base, lo, hi in g.runs:
                yield i, lo, hi, slot[base + hi - 1] < n


def checks_passed(loader, shard: int) -> int:
    """How many checks of `shard` a loader's streams have emitted: the last slot of each read that ends at the
    shard's end."""
    counts = [s.num_samples for s in loader.shardset.shards]
    return sum(i == shard and hi == counts[i] and passed for i, lo, hi, passed in stream_runs(loader))


def unverified(loader) -> set[int]:
    """Positions a loader's streams read in pieces that end before their shard's end (read unverified)."""
    counts = [s.num_samples for s in loader.shardset.shards]
    bases = np.concatenate([[0], np.cumsum(counts)])
    return {int(bases[i]) + j for i, lo, hi, _ in stream_runs(loader) if hi < counts[i] for j in range(lo, hi)}


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
