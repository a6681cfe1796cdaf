"""Seeded fault injection on real prepared shards: every corruption ends in a defined outcome.

Each case damages one copy of a small prepared split in one way (a byte flip in a tar header or a
payload, a truncation, a huge base-256 size, a bad checksum, a changed .cls, samples swapped between
two shards, a removed .cls, a bit flip in a PNG that still decodes) and reads it every way the
pipeline does. Allowed outcomes: a delivered sample is the original sample at its position, bit for
bit (image and label); a skip is counted in the stats (and warned, naming the shard); with strict, a
CorruptDataError naming a damaged shard. Never another exception, never a hang (a timer per case).

What is asserted about samples delivered before a mismatch is found:
* verify=start, and verify=stream with one stream (every read covers whole shards), and the evaluation
  read: no sample of a damaged shard is delivered at all.
* verify=stream over two ranks: a damaged shard's samples are delivered only from pieces that end
  before the shard's end (read unverified), and the shard is counted and warned about in the same run.
* verify=off: the tar-level policy alone; for damage to the tar structure (headers, truncation, sizes,
  checksums, a removed member) every delivered sample is still correct.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import warnings

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.decode import decode_image
from pipeline.data.loader import StreamingLoader
from pipeline.data.report import CorruptDataError, CorruptDataWarning, Report
from pipeline.data.sequential import iter_split
from tests.helpers.corrupt import (
    base256,
    drain,
    fix_checksum,
    members,
    read_bytes,
    reference,
    unverified,
    write_bytes,
    write_members,
)
from tests.helpers.data import copy_folder, make_shards, member_spans, to_u8

N, PER_SHARD, B = 24, 5, 4  # 5 shards (the last holds 4): two ranks' slices of 12 split shards between them
SHARDS = [f"train-{i:06d}.tar" for i in range(-(-N // PER_SHARD))]
CASES_PER_KIND = 25
SEED = 20261130


# --- the corruptions: each damages `folder` and returns the names of the shards it changed ---------------


def _shard(rng, folder):
    name = SHARDS[int(rng.integers(len(SHARDS)))]
    return name, os.path.join(folder, name)


def header_byte(rng, folder):
    name, path = _shard(rng, folder)
    spans = member_spans(path)
    data = read_bytes(path)
    data[spans[int(rng.integers(len(spans)))][1] + int(rng.integers(512))] ^= int(rng.integers(1, 256))
    write_bytes(path, data)
    return [name]


def _data_span(data, span) -> tuple[int, int]:
    """(start, end) of a member's data (its header's size field; not the padding)."""
    _, header_at, data_at = span
    return data_at, data_at + int(bytes(data[header_at + 124:header_at + 135]), 8)


def payload_byte(rng, folder):
    name, path = _shard(rng, folder)
    spans, data = member_spans(path), read_bytes(path)
    at = int(rng.integers(*_data_span(data, spans[int(rng.integers(len(spans)))])))
    data[at] ^= int(rng.integers(1, 256))
    write_bytes(path, data)
    return [name]


def truncation(rng, folder):
    name, path = _shard(rng, folder)
    write_bytes(path, read_bytes(path)[:int(rng.integers(os.path.getsize(path)))])
    return [name]


def huge_size(rng, folder):
    name, path = _shard(rng, folder)
    spans, data = member_spans(path), read_bytes(path)
    at = spans[int(rng.integers(len(spans)))][1]
    data[at + 124:at + 136] = base256(int(rng.choice([1 << 40, (1 << 88) - 1, 1 << 33])))
    if rng.random() < 0.8:  # most with a valid checksum, so the size itself is what fails
        fix_checksum(data, at)
    write_bytes(path, data)
    return [name]


def bad_checksum(rng, folder):
    name, path = _shard(rng, folder)
    spans, data = member_spans(path), read_bytes(path)
    at = spans[int(rng.integers(len(spans)))][1]
    old = bytes(data[at + 148:at + 156])
    while bytes(data[at + 148:at + 156]) == old:
        data[at + 148:at + 156] = b"%06o\0 " % int(rng.integers(0, 8**6))
    write_bytes(path, data)
    return [name]


def changed_label(rng, folder):
    name, path = _shard(rng, folder)
    spans = member_spans(path)
    _, _, at = spans[2 * int(rng.integers(len(spans) // 2)) + 1]  # members: png, cls per sample
    data = read_bytes(path)
    data[at] = ord(str((int(chr(data[at])) + int(rng.integers(1, 10))) % 10))
    write_bytes(path, data)
    return [name]


def swapped_samples(rng, folder):
    a, b = (SHARDS[i] for i in rng.choice(len(SHARDS), 2, replace=False))
    ia, ib = members(os.path.join(folder, a)), members(os.path.join(folder, b))
    i, j = 2 * int(rng.integers(len(ia) // 2)), 2 * int(rng.integers(len(ib) // 2))
    ia[i:i + 2], ib[j:j + 2] = ib[j:j + 2], ia[i:i + 2]
    write_members(os.path.join(folder, a), ia)
    write_members(os.path.join(folder, b), ib)
    return [a, b]


def removed_label(rng, folder):
    name, path = _shard(rng, folder)
    items = members(path)
    del items[2 * int(rng.integers(len(items) // 2)) + 1]
    write_members(path, items)
    return [name]


def png_bit_flip(rng, folder):
    """A single-bit flip in a PNG member that still decodes (tried until one does)."""
    name, path = _shard(rng, folder)
    spans, data = member_spans(path), read_bytes(path)
    start, end = _data_span(data, spans[2 * int(rng.integers(len(spans) // 2))])
    for _ in range(200):
        at, bit = int(rng.integers(start, end)), 1 << int(rng.integers(8))
        flipped = bytes(data[start:at]) + bytes([data[at] ^ bit]) + bytes(data[at + 1:end])
        with contextlib.suppress(Exception):
            decode_image({"png": flipped}, 8, 3, "png")
            data[at] ^= bit
            break
    assert bytes(data) != read_bytes(path), "no decodable flip found"
    write_bytes(path, data)
    return [name]


KINDS = {"header byte": header_byte, "payload byte": payload_byte, "truncation": truncation,
         "huge base-256 size": huge_size, "bad checksum": bad_checksum, "changed .cls": changed_label,
         "swapped samples": swapped_samples, "removed .cls": removed_label,
         "png bit flip that decodes": png_bit_flip}
STRUCTURAL = {"header byte", "truncation", "huge base-256 size", "bad checksum", "removed .cls"}


# --- reading a damaged copy every way ---------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the per-case timer; a BaseException, so no handler of the code under test can absorb it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    def hang(signum, frame):
        raise Hang(f"{what}: no outcome after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read(loader, n_batches):
    """Delivered (index, image CHW uint8, label), stats, and the CorruptDataWarning messages."""
    out, stats, msgs = drain(loader, n_batches)
    return [(i, img.transpose(2, 0, 1), label) for i, img, label in out], stats, msgs


def named(msgs, damaged):
    """The damaged shards the messages name."""
    return {s for s in damaged for m in msgs if re.search(rf"/{re.escape(s)}\b", m)}


def check_case(folder, damaged, kind, ref):
    def wrong(got) -> set[int]:  # positions delivered with another image or label than the original's
        return {i for i, image, label in got if label != ref[i][2] or not np.array_equal(image, ref[i][1])}

    damaged_positions = {i for i in range(N) if SHARDS[i // PER_SHARD] in damaged}
    one_epoch = -(-N // B) + 1  # passes every position of epoch 0

    def cfg(**kw):
        return DataConfig(shards=folder, **{"shuffle_buffer": 8, "hflip": False, "num_workers": 0, **kw})

    # one stream: verify=start delivers nothing of a damaged shard, verify=stream nothing of a read (a run of
    # consecutive samples in one shuffle window) that holds damaged bytes; each shard counted and warned about
    for verify in ("stream", "start"):
        got, stats, msgs = read(StreamingLoader(cfg(verify=verify), batch_size=B), one_epoch)
        assert not wrong(got) and (verify == "stream" or not {i for i, _, _ in got} & damaged_positions), verify
        assert stats["skipped_shards"] >= len(damaged), verify
        assert named(msgs, damaged) == set(damaged), (verify, msgs)
    # two ranks, verify=stream: damaged samples only from unverified pieces, and never silently
    bad, warned = set(), []
    for rank in (0, 1):
        loader = StreamingLoader(cfg(), batch_size=B, rank=rank, world_size=2)
        got, _, msgs = read(loader, -(-N // (2 * B)) + 1)
        assert wrong(got) <= unverified(loader) & damaged_positions, f"rank {rank}: {sorted(wrong(got))}"
        bad |= wrong(got)
        warned += msgs
    assert {SHARDS[i // PER_SHARD] for i in bad} <= named(warned, damaged)
    # strict: an error naming a damaged shard, and only correct samples before it
    delivered = []
    with pytest.raises(CorruptDataError) as err, warnings.catch_warnings():
        warnings.simplefilter("error", CorruptDataWarning)  # strict never only warns
        it = iter(StreamingLoader(cfg(strict=True), batch_size=B))
        for _ in range(one_epoch):
            b = next(it)
            delivered += zip(b["index"].tolist(), to_u8(b["image"]).transpose(0, 3, 1, 2),
                             b["label"].tolist())
    assert named([str(err.value)], damaged) and not wrong(delivered) and len(str(err.value).splitlines()) == 1
    # the evaluation read: whole shards, always verified
    report = Report(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        samples = list(iter_split(folder, "train", report=report))
    assert not wrong((s.index, s.image, s.label) for s in samples)
    assert not {s.index for s in samples} & damaged_positions and report.skipped_shards >= len(damaged)
    with pytest.raises(CorruptDataError) as err:
        list(iter_split(folder, "train", report=Report(strict=True)))
    assert named([str(err.value)], damaged)
    # verify=off: no crash, no hang; the tar-level policy keeps whole samples whole
    got, _, _ = read(StreamingLoader(cfg(verify="off"), batch_size=B), one_epoch)
    if kind in STRUCTURAL:
        assert not wrong(got)


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    folder, _ = make_shards(str(tmp_path_factory.mktemp("fuzz")), N, per_shard=PER_SHARD)
    return folder, reference(folder)


@pytest.mark.timeout(300)
def test_every_corruption_has_a_defined_outcome(intact, tmp_path):
    folder, ref = intact
    rng = np.random.default_rng(SEED)
    cases = [(kind, k) for k in range(CASES_PER_KIND) for kind in KINDS]
    for n, (kind, k) in enumerate(cases):
        copy = copy_folder(folder, str(tmp_path / f"case-{n}"))
        damaged = KINDS[kind](rng, copy)
        assert all(read_bytes(os.path.join(copy, s)) != read_bytes(os.path.join(folder, s)) for s in damaged)
        what = f"case {n} ({kind} #{k}, seed {SEED}, damaged {damaged})"
        try:
            with time_limit(20, what):
                check_case(copy, damaged, kind, ref)
        except Exception as exc:
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    assert len(cases) >= 200
