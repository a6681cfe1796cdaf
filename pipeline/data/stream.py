"""The streaming loader: WebDataset shards -> float batches in [-1, 1], exact epochs, resumable.

    loader = StreamingLoader(cfg.data, batch_size=micro_batch_per_gpu, rank=rank, world_size=world_size)
    for batch in loader:              # infinite; batch["image"] (B, C, H, W) float32, batch["label"] (B,) int64
        ...
    loader.state_dict() / loader.load_state_dict(sd)

How samples are assigned (the part that makes epochs exact with any shard count; docs/data.md):

* Streams. Each rank runs K = max(1, num_workers) worker streams; stream s = worker * world_size + rank
  of T = world_size * K. The DataLoader takes batches from its workers round-robin, so rank r's batch k
  comes from worker k mod K, and the global batch sequence is g = k * world_size + r.
* One endless global order. Epoch e is a permutation of the split's N samples; the global stream is
  epoch 0, epoch 1, ... back to back, cut into chunks of B: chunk g holds positions [g*B, (g+1)*B) and
  belongs to stream g mod T. So every batch is full, every rank yields batches forever at the same
  rate, and positions [e*N, (e+1)*N) hold every sample exactly once. A remainder (N not a multiple of
  B * world_size) is not dropped or padded: the epoch's last batch is completed by the next epoch's first
  samples (like EDM's InfiniteSampler).
* Slices, not shards. Stream s owns exactly the positions p with (p // B) mod T == s; it reads them as
  one contiguous slice of epoch e's shard sequence (shards in a (seed, epoch)-shuffled order,
  concatenated), at offsets computed from the manifest's per-shard counts. Any shard count works.
* Shuffle. A stream's slice is cut into blocks of `shuffle_buffer` samples; each block is permuted, and
  its flips drawn, by a generator seeded with (seed, epoch, stream, block). Decoding happens after the
  permutation, so skipping to a resume point costs tar reads only.
* Resume. Every batch carries its stream's cursor (epoch, slot within the slice). The loader records
  the cursor of each batch it hands to the consumer, so prefetched batches never count. On resume each
  stream restarts at its cursor and the round-robin order is rotated to continue at worker k mod K.

Resampled mode draws shards with replacement per stream (generator seeded with (seed, stream, round)),
reading shards until a round holds >= shuffle_buffer samples; it needs no per-shard counts.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ManifestError, Shard, is_url, read_manifest

STATE_VERSION = 1
_IMAGE_EXTS = ("png", "u8", "jpg", "jpeg", "webp", "ppm")
_SCALE = np.float32(1.0 / 127.5)


class CorruptDataWarning(UserWarning):
    """A shard or sample was unreadable and has been skipped (counted in loader.stats)."""


class CorruptDataError(RuntimeError):
    """A shard or sample was unreadable and data.strict=true."""


# ---------------------------------------------------------------------------------------------------
# The shard list


@dataclass
class ShardSet:
    shards: list[Shard]  # num_samples == -1 where unknown
    image_size: int  # 0 = unknown (taken from each PNG)
    channels: int  # 0 = unknown (images kept as decoded)
    encoding: str  # png | u8 | "" (unknown: by member extension)
    source: str  # what data.shards resolved to, for messages

    @property
    def counts_known(self) -> bool:
        return all(s.num_samples >= 0 for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _count_tar(path: str) -> int:
    with tarfile.open(path, "r:") as tf:
        return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tf if m.isfile()})


def resolve_shards(spec: str, split: str, *, need_counts: bool) -> ShardSet:
    """data.shards -> shard list: a prepared folder, a manifest path, a brace pattern or URLs ('::'-joined)."""
    from webdataset.shardlists import expand_urls

    spec = spec.strip()
    if not spec:
        raise ValueError("data.shards is empty; set it to a prepared folder (python -m pipeline.data.prepare ...)")
    looks_like_tars = ".tar" in spec or "{" in spec or "::" in spec or spec.startswith("pipe:")
    if not looks_like_tars:
        if not is_url(spec) and not os.path.exists(spec):
            raise FileNotFoundError(
                f"data.shards={spec!r} does not exist; give a folder written by "
                "`python -m pipeline.data.prepare SOURCE --out DIR`, its manifest.json, a brace pattern or URLs"
            )
        m = read_manifest(spec)
        return _from_manifest(m, m.shards(split), spec)
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"data.shards={spec!r} expands to an empty shard list")
    # a manifest beside the shards gives counts and image geometry
    first = urls[0]
    manifest: Manifest | None = None
    if not first.startswith("pipe:"):
        folder = first.rsplit("/", 1)[0] if "/" in first else "."
        try:
            manifest = read_manifest(f"{folder}/{MANIFEST_NAME}")
        except (ManifestError, OSError):
            manifest = None
    if manifest is not None:
        by_name = {s.name: s for shards in manifest.splits.values() for s in shards}
        shards = [Shard(u, u.rsplit("/", 1)[-1], *_count_sha(by_name, u)) for u in urls]
        return _from_manifest(manifest, shards, spec)
    shards = []
    for u in urls:
        n = -1
        if need_counts and not is_url(u) and os.path.exists(u):
            n = _count_tar(u)  # local shards without a manifest: count them (reads tar headers only)
        shards.append(Shard(u, u.rsplit("/", 1)[-1], n))
    return ShardSet(shards, 0, 0, "", spec)


def _count_sha(by_name: dict[str, Shard], url: str) -> tuple[int, str]:
    s = by_name.get(url.rsplit("/", 1)[-1])
    return (s.num_samples, s.sha256) if s else (-1, "")


def _from_manifest(m: Manifest, shards: list[Shard], spec: str) -> ShardSet:
    return ShardSet(shards, m.image_size, m.channels, m.encoding, spec)


# ---------------------------------------------------------------------------------------------------
# Reading tars


def _open(url: str):
    """Local path, pipe:COMMAND, or any URL fsspec knows (s3://, gs://, http://, ...)."""
    if url.startswith("pipe:") or not is_url(url) or url.startswith("file:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=1 << 20)
    import fsspec

    return fsspec.open(url, "rb").open()


_ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


class _Truncated(EOFError):
    def __init__(self, name: str, got: int, size: int):
        super().__init__(f"member {name} truncated ({got} of {size} bytes)")
        self.name = name


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, in order.

    A small POSIX/GNU tar reader: tarfile spends ~100 us of Python per member (header objects, pax
    bookkeeping), which is most of the per-sample cost at 32x32; this reads only what WebDataset
    shards use (ustar, GNU long names, pax path) and checks each header's checksum.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise EOFError(f"tar header cut short ({len(header)} of 512 bytes)")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as 8 spaces
            raise tarfile.ReadError("bad tar header checksum (not a tar, or corrupted)")
        size, kind = _octal(header[124:136]), header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise _Truncated(header[:100].split(b"\0", 1)[0].decode(errors="replace"), len(data), size)
        if size % 512:
            stream.read(512 - size % 512)
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":
            long_name = _pax(data).get("path", long_name)
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        yield name, data


def _tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members by key (WebDataset convention).

    Raises the underlying error (OSError, tarfile.TarError, EOFError) on a truncated or unreadable tar.
    """
    stream = _open(url)
    try:
        key, parts = None, {}
        try:
            for name, data in _tar_members(stream):
                k, _, ext = name.rsplit("/", 1)[-1].partition(".")
                if k != key and key is not None:
                    yield key, parts  # complete: the next key's header has been read
                    parts = {}
                key = k
                parts[ext.lower()] = data
        except _Truncated as exc:
            if key is not None and exc.name.rsplit("/", 1)[-1].partition(".")[0] != key:
                yield key, parts  # the cut fell in the next sample; this one is whole
            raise
        if key is not None:
            yield key, parts
    finally:
        stream.close()


@dataclass
class _Raw:
    key: str
    parts: dict[str, bytes] | None  # None = unreadable (truncated or missing shard)
    index: int  # sample index within the split (manifest order); -1 where unknown
    shard: str


class _Report:
    """Skip counting and warnings (or raising, when strict) for one stream."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped_samples = 0
        self.skipped_shards = 0

    def shard_failed(self, shard: Shard, last_key: str | None, exc: BaseException, lost: int) -> None:
        where = f"after key {last_key}" if last_key else "before its first sample"
        msg = f"shard {shard.url}: unreadable {where} ({type(exc).__name__}: {exc})"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare for it, or set data.strict=false to skip it")
        self.skipped_shards += 1
        lost_txt = f"{lost} samples" if lost >= 0 else "its remaining samples"
        warnings.warn(f"{msg}; skipping {lost_txt} (data.strict=true raises instead)", CorruptDataWarning, stacklevel=2)

    def sample_failed(self, raw: _Raw, why: str) -> None:
        msg = f"shard {raw.shard}, key {raw.key}: {why}"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare, or set data.strict=false to skip it")
        self.skipped_samples += 1
        warnings.warn(f"{msg}; sample skipped (data.strict=true raises instead)", CorruptDataWarning, stacklevel=2)


def _read_piece(shard: Shard, base: int, lo: int, hi: int, report: _Report) -> Iterator[_Raw]:
    """Samples lo..hi-1 of one shard; unreadable ones come out as placeholders so positions stay aligned."""
    k, last_key = 0, None
    try:
        for key, parts in _tar_samples(shard.url):
            if k >= hi:
                break
            if k >= lo:
                yield _Raw(key, parts, base + k, shard.url)
            k, last_key = k + 1, key
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        report.shard_failed(shard, last_key, exc, hi - max(k, lo))
        for j in range(max(k, lo), hi):
            yield _Raw(f"#{j}", None, base + j, shard.url)
        return
    if k < hi:  # fewer samples than the manifest says
        report.shard_failed(shard, last_key, EOFError(f"{k} samples, the manifest says {shard.num_samples}"), hi - k)
        for j in range(max(k, lo), hi):
            yield _Raw(f"#{j}", None, base + j, shard.url)


# ---------------------------------------------------------------------------------------------------
# The sample assignment (pure arithmetic on the manifest counts; see the module docstring)


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]))


class _Plan:
    def __init__(self, counts: list[int], batch_size: int, world_size: int, workers: int, seed: int):
        self.counts, self.B, self.R, self.K, self.seed = counts, batch_size, world_size, workers, seed
        self.T = world_size * workers
        self.N = sum(counts)

    def stream(self, rank: int, worker: int) -> int:
        return worker * self.R + rank

    def _before(self, x: int, s: int) -> int:
        """Positions p < x owned by stream s: (p // B) mod T == s."""
        cycle = self.T * self.B
        return (x // cycle) * self.B + min(max(x % cycle - s * self.B, 0), self.B)

    def slice(self, epoch: int, s: int) -> tuple[int, int]:
        """(start, length) of stream s's slice of epoch `epoch`'s concatenated shard sequence."""
        lo, hi = epoch * self.N, (epoch + 1) * self.N
        start = sum(self._before(hi, t) - self._before(lo, t) for t in range(s))
        return start, self._before(hi, s) - self._before(lo, s)

    def shard_order(self, epoch: int) -> np.ndarray:
        return _seed(self.seed, epoch, 0x5A4D).permutation(len(self.counts))

    def pieces(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, base index in the split, lo, hi) covering offsets [start, stop) of the epoch sequence."""
        bases = np.concatenate([[0], np.cumsum(self.counts)])
        offset = 0
        for i in self.shard_order(epoch):
            n = self.counts[i]
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                yield int(i), int(bases[i]), lo, hi
            offset += n
            if offset >= stop:
                break


# ---------------------------------------------------------------------------------------------------
# The per-stream pipeline: a flat list of stages, each a generator over the previous one.


@dataclass
class _Slot:
    raw: _Raw
    flip: bool
    cursor: tuple[int, int]  # stream position after this slot: (epoch or round, slot index)


class _Stream(IterableDataset):
    """One rank's dataset; each DataLoader worker (or the main process when num_workers=0) is a stream."""

    def __init__(self, shardset: ShardSet, cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 cursors: list[tuple[int, int]], rotation: int):
        self.shardset, self.cfg, self.B = shardset, cfg, batch_size
        self.rank, self.R = rank, world_size
        self.K = max(1, cfg.num_workers)
        self.cursors, self.rotation = cursors, rotation
        counts = [s.num_samples for s in shardset.shards]
        self.plan = _Plan(counts, batch_size, world_size, self.K, cfg.seed) if shardset.counts_known else None
        self.block = cfg.shuffle_buffer if cfg.shuffle_buffer > 1 else 0  # 0 = no sample shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.K
        if info is not None:
            torch.set_num_threads(1)  # decode is per-sample numpy/PIL work; avoid oversubscribing cores
        s = worker * self.R + self.rank
        report = _Report(self.cfg.strict)
        epoch, slot = self.cursors[worker]
        stages = [
            # 1. permuted slots of this stream, from its cursor on: exact = its slice of each epoch,
            #    resampled = rounds of shards drawn with replacement; unreadable samples are placeholders
            self._exact_slots(s, epoch, slot, report) if self.cfg.mode == "exact"
            else self._resampled_slots(s, epoch, slot, report),
            # 2. decode to uint8 (H, W, C) and apply the slot's flip; bad samples counted and dropped
            lambda src: self._decode(src, report),
            # 3. batches of B as float32 (B, C, H, W) in [-1, 1]; each carries the stream cursor
            lambda src: self._batch(src, worker, report),
        ]
        it = stages[0]
        for stage in stages[1:]:
            it = stage(it)
        return it

    # stage 1 (exact) ----------------------------------------------------------------------------
    def _exact_slots(self, s: int, epoch: int, slot: int, report: _Report) -> Iterator[_Slot]:
        plan, shards = self.plan, self.shardset.shards
        assert plan is not None
        while True:
            start, length = plan.slice(epoch, s)
            if slot < length:
                block = self.block or length
                first_block = slot // block
                reader = (
                    raw
                    for i, base, lo, hi in plan.pieces(epoch, start + first_block * block, start + length)
                    for raw in _read_piece(shards[i], base, lo, hi, report)
                )
                for b in range(first_block, math.ceil(length / block)):
                    n = min(block, length - b * block)
                    raws = [next(reader) for _ in range(n)]
                    rng = _seed(self.cfg.seed, epoch, s, b, 0xB10C)
                    perm = rng.permutation(n) if self.block else np.arange(n)
                    flips = rng.random(n) < 0.5
                    for j in range(slot - b * block if b == first_block else 0, n):
                        yield _Slot(raws[perm[j]], bool(flips[j]) and self.cfg.hflip, (epoch, b * block + j + 1))
            epoch, slot = epoch + 1, 0

    # stage 1 (resampled) ------------------------------------------------------------------------
    def _resampled_slots(self, s: int, rnd: int, slot: int, report: _Report) -> Iterator[_Slot]:
        shards = self.shardset.shards
        known = self.shardset.counts_known
        bases = np.concatenate([[0], np.cumsum([sh.num_samples for sh in shards])]) if known else None
        while True:
            rng = _seed(self.cfg.seed, s, rnd, 0x2E5A)
            raws: list[_Raw] = []
            draws = 0
            while len(raws) < max(1, self.block):
                draws += 1
                if draws > 10 * len(shards) and not raws:
                    raise CorruptDataError(f"no readable sample in {draws - 1} shard draws from {self.cfg.shards!r}")
                i = int(rng.integers(len(shards)))
                n = shards[i].num_samples if known else 1 << 62
                base = int(bases[i]) if bases is not None else -1
                raws.extend(_read_piece(shards[i], base, 0, n, report) if known else _read_all(shards[i], report))
            perm = rng.permutation(len(raws)) if self.block else np.arange(len(raws))
            flips = rng.random(len(raws)) < 0.5
            for j in range(slot, len(raws)):
                yield _Slot(raws[perm[j]], bool(flips[j]) and self.cfg.hflip, (rnd, j + 1))
            rnd, slot = rnd + 1, 0

    # stage 2 ------------------------------------------------------------------------------------
    def _decode(self, slots: Iterator[_Slot], report: _Report) -> Iterator[tuple[np.ndarray, int, int, _Slot]]:
        size, channels, encoding = self.shardset.image_size, self.shardset.channels, self.shardset.encoding
        # a stream that finds nothing readable must fail, not spin forever (a hung rank hangs them all)
        limit = max(self.plan.N if self.plan else 0, 10 * max(self.block, 1), 1000)
        bad_in_row = 0
        for sl in slots:
            raw = sl.raw
            if bad_in_row >= limit:
                raise CorruptDataError(
                    f"{bad_in_row} unreadable samples in a row (last: shard {raw.shard}); the shards in "
                    f"data.shards={self.cfg.shards!r} look broken: re-run prepare"
                )
            if raw.parts is None:
                report.skipped_samples += 1  # its shard's failure was reported once, with the count
                bad_in_row += 1
                yield None, 0, 0, sl  # keeps the cursor moving
                continue
            try:
                image = _decode_image(raw.parts, size, channels, encoding)
                label = int(raw.parts["cls"]) if "cls" in raw.parts else -1
            except CorruptDataError:
                raise
            except Exception as exc:
                report.sample_failed(raw, f"cannot decode ({type(exc).__name__}: {exc})")
                bad_in_row += 1
                yield None, 0, 0, sl
                continue
            bad_in_row = 0
            if sl.flip:
                image = image[:, ::-1]
            yield image, label, raw.index, sl

    # stage 3 ------------------------------------------------------------------------------------
    def _batch(self, items, worker: int, report: _Report) -> Iterator[dict[str, Any]]:
        out, labels, indices = None, [], []
        in_worker = get_worker_info() is not None
        for image, label, index, sl in items:
            if image is None:
                continue
            if out is None:
                h, w, c = image.shape
                batch = torch.empty((self.B, c, h, w), dtype=torch.float32)
                if in_worker:
                    batch.share_memory_()  # filled in place: the DataLoader then sends it without a copy
                out = batch.numpy()
            elif image.shape != (out.shape[2], out.shape[3], out.shape[1]):
                report.sample_failed(sl.raw, f"image shape {image.shape} differs from the batch's (H, W, C)")
                continue
            # uint8 -> [-1, 1] (0 -> -1, 255 -> 1 exactly), written straight into the batch in CHW:
            # per-sample numpy passes stay in cache and never touch torch's intra-op thread pool
            dst = out[len(labels)]
            np.multiply(image.transpose(2, 0, 1), _SCALE, out=dst, casting="unsafe")
            dst -= np.float32(1.0)
            labels.append(label)
            indices.append(index)
            if len(labels) == self.B:
                yield {
                    "image": batch,
                    "label": torch.tensor(labels, dtype=torch.int64),
                    "index": torch.tensor(indices, dtype=torch.int64),
                    "_worker": worker,
                    "_cursor": sl.cursor,
                    "_skipped": (report.skipped_samples, report.skipped_shards),
                }
                out, labels, indices = None, [], []


def _read_all(shard: Shard, report: _Report) -> list[_Raw]:
    out: list[_Raw] = []
    last = None
    try:
        for key, parts in _tar_samples(shard.url):
            out.append(_Raw(key, parts, -1, shard.url))
            last = key
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        report.shard_failed(shard, last, exc, -1)
    return out


def _decode_image(parts: dict[str, bytes], size: int, channels: int, encoding: str) -> np.ndarray:
    """uint8 (H, W, C) from a sample's image member; checks the geometry the manifest promises."""
    ext = encoding if encoding in parts else next((e for e in _IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(parts)})")
    data = parts[ext]
    if ext == "u8":
        if not size or not channels:
            raise ValueError("raw u8 samples need image_size/channels from a manifest")
        if len(data) != size * size * channels:
            raise ValueError(f"{len(data)} bytes, expected {size}x{size}x{channels}")
        return np.frombuffer(data, np.uint8).reshape(size, size, channels)
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=None if ext != "png" else ("PNG",)) as im:
        want = {1: "L", 3: "RGB"}.get(channels)
        if want and im.mode != want:
            im = im.convert(want)
        image = np.asarray(im)
    if image.ndim == 2:
        image = image[:, :, None]
    if size and image.shape[:2] != (size, size):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}")
    return image


# ---------------------------------------------------------------------------------------------------
# The loader


class StreamingLoader:
    """Per-rank loader; infinite iteration; state_dict() is the position of the next batch the consumer gets."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0 (the per-rank micro batch)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.K = max(1, cfg.num_workers)
        exact = cfg.mode == "exact"
        self.shardset = resolve_shards(cfg.shards, cfg.split, need_counts=exact)
        shards = self.shardset.shards
        if not shards:
            raise ValueError(f"data.shards={cfg.shards!r} split {cfg.split!r} has no shards; re-run prepare")
        missing = [s.url for s in shards if not is_url(s.url) and not os.path.exists(s.url)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(shards)} shards are missing, e.g. {missing[0]}; "
                "re-run prepare, or fix data.shards"
            )
        if exact and not self.shardset.counts_known:
            raise ValueError(
                f"data.mode=exact needs per-shard sample counts, but {cfg.shards!r} has no manifest.json beside "
                "its shards; point data.shards at the prepared folder, copy manifest.json next to the shards, "
                "or use data.mode=resampled"
            )
        self.num_samples = self.shardset.num_samples if self.shardset.counts_known else -1
        if exact and self.num_samples == 0:
            raise ValueError(f"data.shards={cfg.shards!r} split {cfg.split!r} holds 0 samples")
        # nominal: the epoch's last batch is completed by the next epoch's first samples
        self.batches_per_epoch = math.ceil(self.num_samples / (batch_size * world_size)) if exact else -1
        self._batches = 0
        self._cursors: list[tuple[int, int]] = [(0, 0)] * self.K
        self._skipped_base = (0, 0)
        self._skipped: dict[int, tuple[int, int]] = {}
        self._generation = 0

    # -- state ---------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        s = [self._skipped_base, *self._skipped.values()]
        return {
            "batches": self._batches,
            "skipped_samples": sum(x[0] for x in s),
            "skipped_shards": sum(x[1] for x in s),
        }

    @property
    def epoch(self) -> int:
        """Epoch of the next sample (exact mode): samples delivered on all ranks // N."""
        if self.num_samples <= 0:
            return 0
        return self._batches * self.batch_size * self.world_size // self.num_samples

    def _layout(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "seed": self.cfg.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_workers": self.K,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        st = self.stats
        return {"version": STATE_VERSION, **self._layout(), "batches": self._batches,
                "cursors": [list(c) for c in self._cursors],
                "skipped": [st["skipped_samples"], st["skipped_shards"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._layout()
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if {"mode", "seed", "num_samples"} & changed.keys():
            raise ValueError(
                f"loader state does not match this data/config: {changed} (saved, now); "
                "resume with the same data.shards, data.mode and data.seed"
            )
        self._skipped_base = tuple(state["skipped"])
        self._skipped = {}
        if changed:
            # another world size, batch size, worker count or buffer assigns positions differently; the
            # exactly-once guarantee holds from the next epoch boundary on
            nxt = state["batches"] * state["batch_size"] * state["world_size"] // max(self.num_samples, 1) + 1
            warnings.warn(f"loader layout changed {changed} (saved, now): continuing at the start of epoch {nxt}",
                          stacklevel=2)
            self._batches = math.ceil(nxt * self.num_samples / (self.batch_size * self.world_size))
            self._cursors = [(nxt, 0)] * self.K
        else:
            self._batches = int(state["batches"])
            self._cursors = [tuple(c) for c in state["cursors"]]
        self._generation += 1

    # -- iteration -----------------------------------------------------------------------------
    def _dataset(self) -> _Stream:
        return _Stream(self.shardset, self.cfg, self.batch_size, self.rank, self.world_size,
                       list(self._cursors), rotation=self._batches % self.K)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            generation = self._generation
            base = self.stats
            self._skipped_base = (base["skipped_samples"], base["skipped_shards"])
            self._skipped = {}
            ds = self._dataset()
            if self.cfg.num_workers == 0:
                source = iter(ds)
            else:
                source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                         prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
            try:
                for batch in source:
                    worker = batch.pop("_worker")
                    self._cursors[worker] = tuple(batch.pop("_cursor"))
                    self._skipped[worker] = tuple(batch.pop("_skipped"))
                    self._batches += 1
                    yield batch
                    if self._generation != generation:
                        break  # load_state_dict was called: restart the workers at the new position
            finally:
                del source
