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

* Skips. A failed shard read leaves placeholder slots for its lost samples; counts and the warning
  happen when a slot is emitted, never when a block is (re)read, so stats are a function of the
  consumer's position and survive resume. A shard counts once per epoch over all streams: by the
  stream whose piece holds its first lost sample.
* Transfer. A batch is one uint8 buffer [labels | indices | image]; DataLoader workers write it into
  a preallocated shared ring and send only the slot number (docs/data.md).

Resampled mode draws shards with replacement per stream (generator seeded with (seed, stream, round)),
reading shards until a round holds >= shuffle_buffer samples; it needs no per-shard counts.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import time
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
    members: frozenset[str] = frozenset()  # extensions every sample has (from the manifest); empty = unknown

    @property
    def counts_known(self) -> bool:
        return all(s.num_samples >= 0 for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _count_tar(path: str) -> int:
    """Samples in a local tar, from its headers (tarfile seeks over the data); a truncated tar raises."""
    try:
        with tarfile.open(path, "r:") as tf:
            keys = {m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tf if m.isfile()}
            end = tf.offset  # where the end-of-archive block must be
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(512) != _ZERO_BLOCK:  # tarfile stops quietly at a cut header or member
                raise EOFError("no end-of-archive block after its last whole member (truncated)")
        return len(keys)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise CorruptDataError(
            f"shard {path} is unreadable ({type(exc).__name__}: {exc}), so exact mode cannot count its samples; "
            "re-run prepare (its manifest.json gives the counts), remove it, or use data.mode=resampled"
        ) from exc


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
        except (ManifestError, OSError, ValueError, ImportError):
            manifest = None  # also an unknown protocol: _check_shards names it
    if manifest is not None:
        by_name = {s.name: s for shards in manifest.splits.values() for s in shards}
        shards = []
        for u in urls:
            n, sha = _count_sha(by_name, u)
            if n < 0 and need_counts and (p := _local_path(u)) is not None and os.path.isfile(p):
                n = _count_tar(p)  # in the pattern but not in the manifest: count it (headers only)
            shards.append(Shard(u, u.rsplit("/", 1)[-1], n, sha))
        return _from_manifest(manifest, shards, spec)
    shards = []
    for u in urls:
        n = -1
        if need_counts and (p := _local_path(u)) is not None and os.path.isfile(p):
            n = _count_tar(p)  # local shards without a manifest: count them (reads tar headers only)
        shards.append(Shard(u, u.rsplit("/", 1)[-1], n))
    return ShardSet(shards, 0, 0, "", spec)


def _local_path(url: str) -> str | None:
    """The file a local shard names (a path or file:// URL); None for pipe: and remote URLs."""
    if url.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(url).path)
    return None if is_url(url) else url


def _check_shards(shards: list[Shard], spec: str) -> None:
    """At start: every local shard exists, and every remote protocol has an fsspec backend installed.

    pipe: commands and remote objects are checked when opened (a failure is counted and skipped, or
    raises with data.strict=true): probing them all here would cost a round trip per shard per rank.
    """
    missing = [s.url for s in shards if (p := _local_path(s.url)) is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards of data.shards={spec!r} are missing: {shown}; "
            "re-run prepare, or fix data.shards"
        )
    protocols = sorted({s.url.split("://", 1)[0] for s in shards
                        if "://" in s.url and not s.url.startswith(("pipe:", "file:"))})
    for proto in protocols:
        try:
            import fsspec

            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as exc:
            raise ValueError(
                f"data.shards={spec!r} uses {proto}:// URLs, which fsspec cannot open here ({exc}); install "
                f"its backend (e.g. s3fs, gcsfs, aiohttp for http) or use pipe: commands"
            ) from exc


def _count_sha(by_name: dict[str, Shard], url: str) -> tuple[int, str]:
    s = by_name.get(url.rsplit("/", 1)[-1])
    return (s.num_samples, s.sha256) if s else (-1, "")


def _from_manifest(m: Manifest, shards: list[Shard], spec: str) -> ShardSet:
    # prepare writes <key>.<encoding> for every sample, and <key>.cls for all of them when labelled
    members = frozenset({m.encoding} | ({"cls"} if m.num_classes > 0 else set())) if m.encoding else frozenset()
    return ShardSet(shards, m.image_size, m.channels, m.encoding, spec, members)


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
    """The tar stops before a member or its header is whole; `name` is the cut member's (None: unknown)."""

    def __init__(self, what: str, name: str | None = None):
        super().__init__(what)
        self.name = name


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, in order.

    A small POSIX/GNU tar reader: tarfile spends ~100 us of Python per member (header objects, pax
    bookkeeping), which is most of the per-sample cost at 32x32; this reads only what WebDataset
    shards use (ustar, GNU long names, pax path) and checks each header's checksum. A stream that
    ends without tar's end-of-archive block (a zero block) is truncated, wherever the cut fell.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if not header:
            raise _Truncated("tar ends without its end-of-archive block (cut at a member boundary)")
        if header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise _Truncated(f"tar header cut short ({len(header)} of 512 bytes)")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as 8 spaces
            raise tarfile.ReadError("bad tar header checksum (not a tar, or corrupted)")
        size, kind = _octal(header[124:136]), header[156:157]
        data = stream.read(size)
        if len(data) < size:
            name = long_name or header[:100].split(b"\0", 1)[0].decode(errors="replace")
            raise _Truncated(f"member {name} truncated ({len(data)} of {size} bytes)", name)
        if size % 512:
            stream.read(512 - size % 512)  # a short padding read shows up as a missing header next
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


_READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def _key_ext(name: str) -> tuple[str, str]:
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext.lower()


def _tar_samples(url: str, members: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members by key (WebDataset convention).

    At a cut or unreadable member, the sample being grouped is yielded only if it is provably whole:
    the failing member belongs to another key, or it has every member a sample of this shard has
    (`members`, from the manifest; without one, the previous sample's). Then the error is raised
    (OSError, tarfile.TarError, EOFError, ValueError); for a `pipe:` command, its exit status.
    """
    stream = _open(url)
    finished = False
    try:
        key, parts, ref = None, {}, members or None
        try:
            for name, data in _tar_members(stream):
                k, ext = _key_ext(name)
                if k != key and key is not None:
                    yield key, parts  # complete: the next key's header has been read
                    ref, parts = members or frozenset(parts), {}
                key = k
                parts[ext] = data
        except _READ_ERRORS as exc:
            cut = exc.name if isinstance(exc, _Truncated) else None
            if key is not None and (
                (cut is not None and _key_ext(cut)[0] != key) or (ref is not None and ref <= parts.keys())
            ):
                yield key, parts
            try:
                stream.close()  # a pipe: command's exit status says more than "truncated"
            except OSError as status:
                raise status from exc
            raise
        if key is not None:
            yield key, parts
        finished = True
    finally:
        try:
            stream.close()
        except OSError:
            if finished:  # a command that failed after writing a whole tar
                raise
            # stopped early on purpose: a pipe's command may die of SIGPIPE, which is no error


@dataclass
class _Raw:
    key: str
    parts: dict[str, bytes] | None  # None = unreadable (truncated or missing shard)
    index: int  # sample index within the split (manifest order); -1 where unknown
    shard: str
    # a shard read failed here: the message is warned, and the shard counted, when this slot is emitted
    # (emission is once per position, also across resume; reading is not: a resumed block is re-read)
    failure: str = ""
    lost: bool = True  # with parts None: a lost sample (False: only a failure marker, no sample behind it)


class _Report:
    """Skip counting and warnings (or raising, when strict) for one stream.

    Counts change only when a slot is emitted (the decode stage), so a batch's snapshot of them covers
    exactly the positions up to its cursor, and a stream restarted at that cursor never counts twice.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped_samples = 0
        self.skipped_shards = 0

    def shard_failed(self, shard: Shard, last_key: str | None, exc: BaseException, lost: str) -> str:
        """The message for a failed shard read; raises when strict (at read time, as early as possible)."""
        where = f"after key {last_key}" if last_key else "before its first sample"
        msg = f"shard {shard.url}: unreadable {where} ({type(exc).__name__}: {exc})"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare for it, or set data.strict=false to skip it") from exc
        return f"{msg}; skipping {lost} (data.strict=true raises instead)"

    def emitted(self, raw: _Raw) -> None:
        if raw.failure:
            self.skipped_shards += 1
            warnings.warn(raw.failure, CorruptDataWarning, stacklevel=2)
        if raw.parts is None and raw.lost:
            self.skipped_samples += 1

    def sample_failed(self, raw: _Raw, why: str) -> None:
        msg = f"shard {raw.shard}, key {raw.key}: {why}"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare, or set data.strict=false to skip it")
        self.skipped_samples += 1
        warnings.warn(f"{msg}; sample skipped (data.strict=true raises instead)", CorruptDataWarning, stacklevel=2)


def _read_piece(shard: Shard, base: int, lo: int, hi: int, report: _Report,
                members: frozenset[str] = frozenset()) -> Iterator[_Raw]:
    """Samples lo..hi-1 of one shard; unreadable ones come out as placeholders so positions stay aligned.

    A shard that fails at its sample k is counted once per epoch over all ranks and workers: by the
    stream whose piece holds sample k (lo <= k < hi). Streams whose piece starts after k count only
    their lost samples.
    """
    k, last_key = 0, None
    try:
        for key, parts in _tar_samples(shard.url, members):
            if k >= lo:
                yield _Raw(key, parts, base + k, shard.url)
            k, last_key = k + 1, key
            if k >= hi:
                return  # read no further: what lies after this piece is another stream's
        exc: BaseException = EOFError(f"the tar holds {k} samples, the manifest says {shard.num_samples}")
    except _READ_ERRORS as e:
        exc = e
    first = max(k, lo)
    lost = f"its samples {k}..{shard.num_samples - 1} ({shard.num_samples - k} of {shard.num_samples})"
    note = report.shard_failed(shard, last_key, exc, lost) if k >= lo or report.strict else ""
    for j in range(first, hi):
        yield _Raw(f"#{j}", None, base + j, shard.url, failure=note if j == first else "")


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
                 cursors: list[tuple[int, int]], rotation: int, ring: _Ring | None = None):
        self.shardset, self.cfg, self.B, self.ring = shardset, cfg, batch_size, ring
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
                    for raw in _read_piece(shards[i], base, lo, hi, report, self.shardset.members)
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
            draws = samples = readable = 0
            while samples < max(1, self.block):
                draws += 1
                if draws > 10 * len(shards) and not readable:
                    # e.g. every pipe: command failing: fail loudly rather than spin (a hung rank hangs them all)
                    last = next((r.failure for r in reversed(raws) if r.failure), "")
                    raise CorruptDataError(f"no readable sample in {draws - 1} shard draws from "
                                           f"{self.cfg.shards!r}; last failure: {last}")
                i = int(rng.integers(len(shards)))
                base = int(bases[i]) if bases is not None else -1
                got = (_read_piece(shards[i], base, 0, shards[i].num_samples, report, self.shardset.members)
                       if known else _read_all(shards[i], report))
                for raw in got:
                    raws.append(raw)
                    samples += raw.lost or raw.parts is not None
                    readable += raw.parts is not None
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
                report.emitted(raw)  # counts a lost sample, and a shard failure on its first one
                bad_in_row += raw.lost
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
        in_worker = get_worker_info() is not None
        seq, buf = 0, None
        for image, label, index, sl in items:
            if image is None:
                continue
            if buf is None:
                h, w, c = image.shape
                buf, slot = self._buffer(worker, seq, _nbytes(self.B, c, h, w), in_worker)
                views = _views(buf, self.B, (c, h, w))
                out, labels, indices = (v.numpy() for v in views)
                n = 0
            elif image.shape != (out.shape[2], out.shape[3], out.shape[1]):
                report.sample_failed(sl.raw, f"image shape {image.shape} differs from the batch's (H, W, C)")
                continue
            # uint8 -> [-1, 1] (0 -> -1, 255 -> 1 exactly), written straight into the batch in CHW:
            # per-sample numpy passes stay in cache and never touch torch's intra-op thread pool
            dst = out[n]
            np.multiply(image.transpose(2, 0, 1), _SCALE, out=dst, casting="unsafe")
            dst -= np.float32(1.0)
            labels[n], indices[n] = label, index
            n += 1
            if n == self.B:
                meta = {"_worker": worker, "_cursor": sl.cursor,
                        "_skipped": (report.skipped_samples, report.skipped_shards)}
                if not in_worker:
                    yield {"image": views[0], "label": views[1], "index": views[2], **meta}
                elif slot >= 0:  # only the slot number crosses the process boundary
                    yield {"_slot": slot, "_seq": seq, "_shape": (c, h, w), **meta}
                else:  # one shared-memory tensor per batch: one file descriptor to pass, not three
                    yield {"_buf": buf, "_shape": (c, h, w), **meta}
                seq, buf = seq + 1, None

    def _buffer(self, worker: int, seq: int, nbytes: int, in_worker: bool) -> tuple[torch.Tensor, int]:
        """Where batch `seq` of this worker is written: (uint8 buffer, ring slot or -1)."""
        ring = self.ring
        if in_worker and ring is not None and ring.buf.shape[2] >= nbytes:
            slots = ring.buf.shape[1]
            # Slot seq % slots last held batch seq - slots. The DataLoader asks a worker for batch j only
            # after the main process took batch j - prefetch_factor, and slots = prefetch_factor + 2, so
            # it has been copied out already; this wait is a guard, not a path taken.
            parent = os.getppid()
            while int(ring.done[worker]) < seq - slots + 1:
                if os.getppid() != parent:
                    raise RuntimeError("the training process exited; stopping this loader worker")
                time.sleep(0.0002)
            return ring.buf[worker, seq % slots, :nbytes], seq % slots
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if in_worker:
            buf.share_memory_()  # filled in place: the DataLoader then sends it without a copy
        return buf, -1


# ---------------------------------------------------------------------------------------------------
# Moving batches from the workers: a batch is one uint8 buffer [labels | indices | image]


@dataclass
class _Ring:
    """Preallocated shared-memory batch slots, (workers, slots, bytes), and per worker the count of its
    batches the main process has copied out (written by the main process, read by the worker)."""

    buf: torch.Tensor
    done: torch.Tensor

    @staticmethod
    def create(workers: int, slots: int, nbytes: int) -> _Ring:
        return _Ring(torch.empty((workers, slots, nbytes), dtype=torch.uint8).share_memory_(),
                     torch.zeros(workers, dtype=torch.int64).share_memory_())


# the ring holds workers x (prefetch_factor + 2) batches of /dev/shm for the loader's lifetime; larger
# batches (big images) are decode-bound, where a fresh buffer per batch costs little
_RING_MAX_BATCH_BYTES = 16 << 20


def _ring_slots(prefetch_factor: int) -> int:
    return prefetch_factor + 2


def _nbytes(batch_size: int, c: int, h: int, w: int) -> int:
    n = 16 * batch_size + 4 * batch_size * c * h * w
    return -(-n // 64) * 64  # rows of a ring start 64-byte aligned


def _views(buf: torch.Tensor, batch_size: int, chw: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """(image float32 (B, C, H, W), label int64 (B,), index int64 (B,)) sharing one uint8 buffer."""
    b8 = 8 * batch_size
    image = buf[2 * b8:2 * b8 + 4 * batch_size * math.prod(chw)].view(torch.float32).view(batch_size, *chw)
    return image, buf[:b8].view(torch.int64), buf[b8:2 * b8].view(torch.int64)


def _read_all(shard: Shard, report: _Report) -> list[_Raw]:
    """A whole shard of unknown size; a failure becomes a marker slot (counted once, when emitted)."""
    out: list[_Raw] = []
    last = None
    try:
        for key, parts in _tar_samples(shard.url):
            out.append(_Raw(key, parts, -1, shard.url))
            last = key
    except _READ_ERRORS as exc:
        note = report.shard_failed(shard, last, exc, "the rest of it (its size is unknown without a manifest)")
        out.append(_Raw("", None, -1, shard.url, failure=note, lost=False))
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
        _check_shards(shards, cfg.shards)
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
    def _ring(self) -> _Ring | None:
        """Shared batch slots for the workers, when the manifest gives the batch geometry up front."""
        size, channels = self.shardset.image_size, self.shardset.channels
        if self.cfg.num_workers == 0 or not size or not channels:
            return None
        nbytes = _nbytes(self.batch_size, channels, size, size)
        if nbytes > _RING_MAX_BATCH_BYTES:
            return None
        return _Ring.create(self.K, _ring_slots(self.cfg.prefetch_factor), nbytes)

    def _dataset(self, ring: _Ring | None = None) -> _Stream:
        return _Stream(self.shardset, self.cfg, self.batch_size, self.rank, self.world_size,
                       list(self._cursors), rotation=self._batches % self.K, ring=ring)

    def _unpack(self, batch: dict[str, Any], worker: int, ring: _Ring | None) -> None:
        """A worker's batch -> image/label/index tensors (in place); frees its ring slot."""
        if "_slot" in batch:
            assert ring is not None
            chw = batch.pop("_shape")
            src = ring.buf[worker, batch.pop("_slot"), :_nbytes(self.batch_size, *chw)]
            buf = src.clone()  # the consumer may keep the batch; the slot is reused
            ring.done[worker] = batch.pop("_seq") + 1
        elif "_buf" in batch:
            buf, chw = batch.pop("_buf"), batch.pop("_shape")
        else:
            return
        batch["image"], batch["label"], batch["index"] = _views(buf, self.batch_size, chw)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            generation = self._generation
            base = self.stats
            self._skipped_base = (base["skipped_samples"], base["skipped_shards"])
            self._skipped = {}
            ring = self._ring()  # new slots per DataLoader: workers of a previous one may still be writing
            ds = self._dataset(ring)
            if self.cfg.num_workers == 0:
                source = iter(ds)
            else:
                source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                         prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
            try:
                for batch in source:
                    worker = batch.pop("_worker")
                    self._unpack(batch, worker, ring)
                    self._cursors[worker] = tuple(batch.pop("_cursor"))
                    self._skipped[worker] = tuple(batch.pop("_skipped"))
                    self._batches += 1
                    yield batch
                    if self._generation != generation:
                        break  # load_state_dict was called: restart the workers at the new position
            finally:
                del source
