"""The tar reader bounds what a header may claim: a corrupted header is a counted shard skip naming the shard.

Before, a base-256 size of 1 TiB or 2**88 crashed a worker with MemoryError/OverflowError (shard not
named) and a pax record of length 0 never returned.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest

from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.report import CorruptDataError, CorruptDataWarning, Report
from pipeline.data.sequential import iter_split
from pipeline.data.tar import MAX_MEMBER_BYTES, count_samples
from tests.helpers.corrupt import base256, fix_checksum, pax_header, read_bytes, set_size_field, write_bytes
from tests.helpers.data import copy_folder, make_shards, member_spans

N, PER_SHARD = 24, 6  # 4 shards
SHARD = "train-000001.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("tar")), N, per_shard=PER_SHARD)[0]


def cfg(folder, **kw):
    return DataConfig(shards=folder, **{"shuffle_buffer": 0, "hflip": False, "num_workers": 0, **kw})


def damaged(shards, tmp_path, edit) -> str:
    """A copy of the prepared folder whose shard 1 got `edit(path, spans)` at its 3rd sample's png header."""
    folder = copy_folder(shards, str(tmp_path / "damaged"))
    path = os.path.join(folder, SHARD)
    edit(path, member_spans(path)[4][1])
    return folder


def size_field(value: bytes, checksum: bool = True):
    return lambda path, at: set_size_field(path, at, value, checksum)


def raw_edit(start: int, value: bytes, checksum: bool = True):
    def edit(path, at):
        data = read_bytes(path)
        data[at + start:at + start + len(value)] = value
        if checksum:
            fix_checksum(data, at)
        write_bytes(path, data)
    return edit


def insert_before(member: bytes):
    def edit(path, at):
        data = read_bytes(path)
        write_bytes(path, data[:at] + member + data[at:])
    return edit


HEADERS = {  # what is written, and what the error must say
    "base-256 size of 1 TiB": (size_field(base256(1 << 40)), r"needs 1099511627776 bytes, \d+ are left"),
    "base-256 size of 2**88 - 1": (size_field(base256((1 << 88) - 1)),
                                   r"needs 309485009821345068724781055 bytes"),
    "base-256 size, checksum not updated": (size_field(base256(1 << 40), checksum=False),
                                            "bad tar header checksum"),
    "negative base-256 size": (size_field(b"\xff" * 12), r"field size is not a number"),
    "size that is not octal": (size_field(b"0000000009a\0"), r"field size is not a number"),
    "signed octal size": (size_field(b"-0000000001\0"), r"field size is not a number"),
    "checksum that is not a number": (raw_edit(148, b"12x456\0 ", checksum=False),
                                      r"field chksum is not a number"),
    "bad checksum": (raw_edit(148, b"000001\0 ", checksum=False), "bad tar header checksum"),
    "pax record of length 0": (insert_before(pax_header(b"0 path=x\n")), "pax record at byte 0"),
    "pax record longer than its header": (insert_before(pax_header(b"99 path=x\n")), "pax record at byte 0"),
    "pax record without a length": (insert_before(pax_header(b"path=x\n")), "pax record at byte 0"),
}


@pytest.mark.timeout(60)  # a pax record of length 0 used to loop for ever
@pytest.mark.parametrize("what", list(HEADERS))
def test_a_corrupted_header_is_a_counted_shard_skip_naming_the_shard(shards, tmp_path, what):
    edit, message = HEADERS[what]
    folder = damaged(shards, tmp_path, edit)
    with pytest.raises(CorruptDataError, match=rf"{SHARD}: unreadable after key \d+ \(.*{message}"):
        next(iter(StreamingLoader(cfg(folder, strict=True), batch_size=N)))
    report = Report(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        assert len(list(iter_split(folder, "train", report=report))) == N - PER_SHARD
    assert report.skipped_shards == 1
    with pytest.raises(CorruptDataError, match=SHARD):
        list(iter_split(folder, "train", report=Report(strict=True)))
    for verify in ("off", "stream"):
        # verify=off: the tar-level policy keeps the two whole samples before the damage; a verifying read
        # cannot check the file, so it delivers none of it
        lost = set(range(PER_SHARD + (2 if verify == "off" else 0), 2 * PER_SHARD))
        loader = StreamingLoader(cfg(folder, verify=verify), batch_size=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            it = iter(loader)
            got = [int(next(it)["index"]) for _ in range(N - len(lost) + 1)]  # an epoch, and one more sample
            it.close()
        msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
        assert sorted(got[:-1]) == sorted(set(range(N)) - lost) and got[-1] not in lost
        assert 1 <= loader.stats["skipped_shards"] == len(msgs) <= 2  # once an epoch
        assert all(SHARD in m and re.search(message, m) and len(m.splitlines()) == 1 for m in msgs), msgs


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:data.verify=stream")  # pipe: shards have no manifest
def test_a_huge_size_from_a_stream_of_unknown_size_is_capped(shards, tmp_path):
    folder = damaged(shards, tmp_path, size_field(base256(1 << 40)))
    pipes = "::".join(f"pipe:cat {os.path.join(folder, f'train-{i:06d}.tar')}" for i in range(N // PER_SHARD))
    loader = StreamingLoader(cfg(pipes, mode="resampled", shuffle_buffer=10), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(loader)
        for _ in range(20):
            next(it)
        it.close()
    msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
    assert loader.stats["skipped_shards"] == len(msgs) >= 1
    assert all(SHARD in m and f"more than a member may have (MAX_MEMBER_BYTES = {MAX_MEMBER_BYTES})" in m
               for m in msgs)


@pytest.mark.parametrize("value", [1 << 40, (1 << 88) - 1])
def test_counting_a_shard_without_manifest_bounds_its_sizes_too(shards, tmp_path, value):
    folder = damaged(shards, tmp_path, size_field(base256(value)))
    os.remove(os.path.join(folder, "manifest.json"))
    assert count_samples(os.path.join(folder, "train-000000.tar")) == PER_SHARD
    pattern = os.path.join(folder, "train-{000000..000003}.tar")
    with pytest.raises(CorruptDataError, match=rf"{SHARD} is unreadable \(TruncatedTar: member \d+\.png "
                                               rf"needs {value} bytes.*data.mode=resampled"):
        StreamingLoader(cfg(pattern), batch_size=4)
