"""A shard's samples as positioned raw samples, and their decoding, under the corruption policy.

Reading yields one Raw per position of the split, so positions stay aligned whatever fails: an
unreadable sample is a placeholder (parts None) carrying the failure, counted when it is emitted
(pipeline.data.report). Reading also checks a shard's sha256 against the manifest (read_piece).
Decoding a Raw gives the uint8 image and label, or None for a skipped one (an undecodable image, or a
missing or out-of-range label in a labelled split).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.decode import decode_image
from pipeline.data.index import ShardIndex
from pipeline.data.manifest import Shard, sha256_differs
from pipeline.data.report import Report
from pipeline.data.shards import ShardSet
from pipeline.data.tar import READ_ERRORS, Span, TruncatedTar, sample_from_bytes, tar_samples


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
               shardset: ShardSet) -> Iterator[Raw]:
    """Samples lo..hi-1 of one shard; unreadable ones come out as placeholders so positions stay aligned.

    With prepare's sample index (shardset.index) only the piece's bytes are read and each sample is
    checked against its own sha256: _read_indexed. Without one (shards prepared before the index existed,
    or without a manifest) the read starts at the shard's first byte (samples before `lo` are parsed, not
    decoded), as follows.
    A shard whose read fails at its sample k is counted once per epoch over all ranks and workers: by
    the stream whose piece holds sample k (lo <= k < hi). Streams whose piece starts after k count only
    their lost samples; the whole samples before k are delivered.

    sha256 (shardset.hashed_while_read): a piece that ends at the shard's end reads the whole file, so
    the file's digest is checked, and the piece is held back until then. If the digest differs (or the
    read fails, so it cannot be checked) none of the piece is delivered; a mismatch is counted on the
    shard's last sample, i.e. once per epoch by the stream that owns it. A piece that ends earlier is
    delivered unverified (docs/data.md: the guarantee). A shard verify=start found changed is not read.
    """
    index = shardset.index.get(shard.url)
    if index is not None and shard.url not in shardset.changed:
        yield from _read_indexed(shard, index, base, lo, hi, report, shardset)
        return
    n, k, last_key = shard.num_samples, 0, None
    verify = hi == n and shardset.hashed_while_read(shard)
    held: list[Raw] = []
    problem, exc = shardset.changed.get(shard.url, ""), None
    if not problem:
        digest = hashlib.sha256() if verify else None
        try:
            samples = tar_samples(shard.url, shardset.members, digest)
            for key, parts in samples:
                if k >= lo:
                    raw = Raw(key, parts, base + k, shard.url)
                    if verify:
                        held.append(raw)
                    else:
                        yield raw
                k, last_key = k + 1, key
                if k >= hi:
                    break  # unless verifying, read no further: what lies after this piece is another stream's
            if k < hi:
                raise EOFError(f"the tar holds {k} samples, the manifest says {n}")
            if digest is not None:
                for _ in samples:  # the rest of the file: tar's padding, or samples the manifest lacks
                    pass
                if digest.hexdigest() != shard.sha256:
                    problem = sha256_differs(digest.hexdigest(), shard.sha256)
        except READ_ERRORS as e:
            exc, problem = e, _unreadable(last_key, e)
    if not problem:
        yield from held
        return
    if exc is not None:  # counted by the owner of the failing sample k (k == n: bytes after the last one)
        carrier = min(k, n - 1) if k >= lo else -1
    else:  # a sha256 mismatch: counted on the shard's last sample, which only the piece up to its end holds
        carrier = hi - 1 if hi == n else -1
    if exc is not None and not verify:  # the whole samples before the failure were delivered
        first, lost = max(k, lo), f"its samples {k}..{n - 1} ({n - k} of {n})"
    else:  # a verifying read, or a shard verify=start found changed: none of the piece is delivered
        first = lo
        lost = f"all {n} of its samples" if lo == 0 else f"its samples {lo}..{n - 1} (this stream's part)"
    note = report.shard_failed(shard, problem, lost, exc) if carrier >= 0 or report.strict else ""
    for j in range(first, hi):
        yield Raw(f"#{j}", None, base + j, shard.url, failure=note if j == carrier else "")


def _read_indexed(shard: Shard, index: ShardIndex, base: int, lo: int, hi: int, report: Report,
                  shardset: ShardSet) -> Iterator[Raw]:
    """Samples lo..hi-1 read from exactly their bytes, [offsets[lo], offsets[hi]) (a seek, a range request,
    or a pipe: command read past its start), each parsed from its own byte range.

    Verifying (shardset.hashed_while_read: the shard has a manifest sha256, data.verify=stream, or start
    for a remote shard), every sample's bytes are checked against the index's sha256 before any of the
    piece is delivered (the piece is held back until then); a sample that differs, or a read that fails,
    loses the whole piece: none of it is delivered. Bytes that no longer parse (a damaged header, a
    truncated file, an unreachable object) are a failed read, counted as in the unindexed read by the
    stream that owns the first lost sample, so once per epoch; bytes that parse but differ from their
    sha256 (a changed label or pixel) are counted on the piece's last sample, so once per piece that
    holds changed bytes. The shard's last sample also covers tar's end-of-archive blocks, so bytes
    appended to a shard after prepare are caught by the piece that ends there. Not verifying, the
    tar-level policy applies: every whole sample before a failure is delivered, a cut or misaligned one
    never.
    """
    n, k, last_key = shard.num_samples, lo, None
    verify = shardset.hashed_while_read(shard)
    offsets, digests = index.offsets, index.digests
    held: list[Raw] = []
    problem, exc, mismatch, first_lost = "", None, -1, lo
    mismatch_key = ("", "")
    span = None
    try:
        span = Span(shard.url, int(offsets[lo]), int(offsets[hi]))
        for k in range(lo, hi):
            want = int(offsets[k + 1] - offsets[k])
            data = span.read(want)
            changed = verify and len(data) == want and hashlib.sha256(data).digest() != digests[k].tobytes()
            try:
                key, parts = sample_from_bytes(data, shardset.members, last=k == n - 1)
            except READ_ERRORS:
                if len(data) == want:
                    raise  # bytes that do not parse: a failed read at this sample, whatever its sha256 says
                key = None
            if changed:  # parses, but is not what prepare wrote (a relabelled sample, a flipped pixel)
                mismatch, mismatch_key = k, (key, hashlib.sha256(data).hexdigest())
                break
            # a short read: the shard ends inside this sample. Not verifying, the last sample is whole
            # when its members are (only tar's end blocks are missing), as in the unindexed read.
            if len(data) < want and (verify or k < n - 1 or key is None):
                last_key = key or last_key
                raise TruncatedTar(f"the shard ends {want - len(data)} bytes before the end of its sample {k} "
                                   f"(at byte {int(offsets[k]) + len(data)}; the index says {index.size})")
            raw = Raw(str(key), parts, base + k, shard.url)
            if verify:
                held.append(raw)
            else:
                yield raw
            last_key = key
    except READ_ERRORS as e:
        exc = e
        if isinstance(e, EOFError) and span is not None:
            try:
                span.close(check=True)
            except OSError as status:  # a pipe: command's exit status says more than "truncated"
                exc = status
        problem = _unreadable(last_key, exc)
        first_lost = _first_lost(exc, k, span, offsets)
    finally:
        if span is not None:
            span.close()
    if mismatch >= 0:
        key, digest = mismatch_key
        problem = (f"its sha256 of sample {mismatch} (key {key}) {digest[:12]}... differs from the manifest's "
                   f"{digests[mismatch].tobytes().hex()[:12]}... (its sample index; the file changed after prepare)")
    if not problem:
        yield from held
        return
    if exc is not None:  # counted by the owner of the first lost sample, as in the unindexed read
        carrier = min(first_lost, n - 1) if first_lost >= lo else -1
    else:  # a sample that differs: counted once per piece holding changed bytes, on its last sample
        carrier = hi - 1
    if exc is not None and not verify:  # the whole samples before the failure were delivered
        first = max(k, lo)
        lost = f"its samples {first}..{hi - 1} ({hi - first} of {n})"
    else:  # a verifying read: none of the piece is delivered
        first = lo
        lost = f"all {n} of its samples" if (lo, hi) == (0, n) else f"its samples {lo}..{hi - 1} (this stream's piece)"
    note = report.shard_failed(shard, problem, lost, exc) if carrier >= 0 or report.strict else ""
    for j in range(first, hi):
        yield Raw(f"#{j}", None, base + j, shard.url, failure=note if j == carrier else "")


def _first_lost(exc: BaseException, k: int, span: Span | None, offsets: np.ndarray) -> int:
    """The shard's first lost sample, which every stream reading a piece of it can tell: where the file
    ends (a truncation; the sample that byte falls in), where its bytes stop parsing, or 0 for a shard
    that cannot be opened or fetched at all (a missing file or object, a failing command or store)."""
    if isinstance(exc, EOFError) and span is not None and span.ended_at is not None:
        return int(np.searchsorted(offsets, span.ended_at, side="right")) - 1
    if isinstance(exc, (EOFError, ValueError)) and not isinstance(exc, OSError):
        return k
    return 0


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
        note = report.shard_failed(shard, _unreadable(last, exc),
                                   "the rest of it (its size is unknown without a manifest)", exc)
        out.append(Raw("", None, -1, shard.url, failure=note, lost=False))
    return out


def _unreadable(last_key: str | None, exc: BaseException) -> str:
    where = f"after key {last_key}" if last_key else "before its first sample"
    return f"unreadable {where} ({type(exc).__name__}: {exc})"


def decode_sample(raw: Raw, shardset: ShardSet, report: Report) -> tuple[np.ndarray, int] | None:
    """(uint8 (H, W, C) image, label or -1), or None for a lost or undecodable sample (counted in `report`)."""
    if raw.parts is None:
        report.emitted(raw)  # counts a lost sample, and a shard failure on the slot that carries it
        return None
    if "cls" in shardset.members and "cls" not in raw.parts:
        report.sample_failed(raw, "has no .cls member, but the manifest says this split is labelled")
        return None
    try:
        image = decode_image(raw.parts, shardset.image_size, shardset.channels, shardset.encoding)
        label = int(raw.parts["cls"]) if "cls" in raw.parts else -1
    except Exception as exc:
        report.sample_failed(raw, f"cannot decode ({type(exc).__name__}: {exc})")
        return None
    if shardset.num_classes and not 0 <= label < shardset.num_classes:
        report.sample_failed(raw, f"label {label} is not one of the manifest's {shardset.num_classes} "
                                  "classes")
        return None
    return image, label
