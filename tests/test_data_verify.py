"""Shards are checked against their manifest sha256 (data.verify), and a labelled split's labels are checked.

A shard whose labels or pixels changed after prepare still parses and decodes: only its sha256 tells.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.report import CorruptDataError, CorruptDataWarning, Report
from pipeline.data.sequential import iter_split, split_batches
from tests.helpers.corrupt import (
    checks_passed,
    drain,
    members,
    read_bytes,
    stream_runs,
    write_bytes,
    write_members,
)
from tests.helpers.data import copy_folder, index_of, make_shards, member_spans

N, PER_SHARD = 40, 8  # 5 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("verify")), N, per_shard=PER_SHARD)


def cfg(folder, **kw):
    return DataConfig(shards=folder, **{"shuffle_buffer": 0, "hflip": False, "num_workers": 0, **kw})


def relabel(folder: str, shard: int, sample: int) -> str:
    """Change one sample's .cls digit in place (same length: the tar still parses); returns its key."""
    path = os.path.join(folder, f"train-{shard:06d}.tar")
    name, _, data_at = member_spans(path)[2 * sample + 1]  # members: png, cls per sample
    assert name.endswith(".cls")
    data = read_bytes(path)
    data[data_at] = ord(str((int(chr(data[data_at])) + 1) % 10))
    write_bytes(path, data)
    return name.split(".")[0]


def run(loader, n_batches):
    """(delivered (index, source index, label) triples, stats after the last batch, the warnings' texts)."""
    out, stats, msgs = drain(loader, n_batches)
    return [(i, index_of(img), label) for i, img, label in out], stats, msgs


def test_a_changed_label_is_trained_on_unverified_and_never_verified(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "relabelled"))
    key = relabel(folder, 2, 3)
    # without verification the changed label reaches the trainer, silently
    got, stats, msgs = run(StreamingLoader(cfg(folder, verify="off"), batch_size=1), N)
    assert [(src, lab) for _, src, lab in got if lab != src % 10] == [(int(key), (int(key) + 1) % 10)]
    assert stats["skipped_shards"] == 0 and msgs == []
    # verify=stream and verify=start: none of the shard's samples, in every epoch; counted once an epoch
    for verify in ("stream", "start"):
        loader = StreamingLoader(cfg(folder, verify=verify), batch_size=1)
        got, stats, msgs = run(loader, 2 * (N - PER_SHARD))  # two epochs of the good samples
        assert sorted(i for i, _, _ in got) == sorted(2 * [i for i in range(N) if not 16 <= i < 24])
        assert all(lab == src % 10 for _, src, lab in got) and int(key) not in {src for _, src, _ in got}
        assert stats["skipped_shards"] == len(msgs) == checks_passed(loader, 2) >= 1
        assert stats["skipped_samples"] == PER_SHARD * stats["skipped_shards"]
        assert all("train-000002.tar: its sha256" in m and "differs from the manifest" in m for m in msgs)
    with pytest.raises(CorruptDataError, match=r"train-000002\.tar: its sha256 .* differs.*strict=false"):
        run(StreamingLoader(cfg(folder, strict=True), batch_size=4), 10)
    # verify=start refuses at start, naming the shard, before any sample is read
    with pytest.raises(CorruptDataError, match=r"verify=start: 1 of 5 shards differ .*train-000002\.tar"):
        StreamingLoader(cfg(folder, verify="start", strict=True), batch_size=4)


def changed_pieces_passed(loader, shard: int, changed: set[int]) -> int:
    """Reads of `shard` holding one of its `changed` samples that a loader's streams have passed: each counts on
    its last slot."""
    return sum(i == shard and any(lo <= j < hi for j in changed) and passed
               for i, lo, hi, passed in stream_runs(loader))


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (3, 0), (1, 2), (2, 2)])
def test_stream_mode_verifies_every_piece_of_every_shard(shards, tmp_path, world, workers):
    """The guarantee with prepare's sample index: every piece of a shard, whichever stream reads it, is
    checked sample by sample before any of it is delivered. A piece that holds a changed sample delivers
    none of its samples and counts once; the other pieces of that shard are whole and delivered. So no
    changed sample reaches the trainer in any layout. verify=start delivers nothing of the shard, counted
    once an epoch by the piece that ends at its end."""
    folder = copy_folder(shards[0], str(tmp_path / "changed"))
    positions = (0, 3, 7)  # first, a middle and last sample of shard 1
    changed = {int(relabel(folder, 1, j)) for j in positions}
    for verify in ("stream", "start"):
        delivered, skipped, expected = [], 0, 0
        for rank in range(world):
            loader = StreamingLoader(cfg(folder, verify=verify, num_workers=workers), batch_size=2, rank=rank,
                                     world_size=world)
            got, stats, msgs = run(loader, 3 * loader.batches_per_epoch)
            delivered += got
            skipped += stats["skipped_shards"]
            expected += (changed_pieces_passed(loader, 1, set(positions)) if verify == "stream"
                         else checks_passed(loader, 1))
            if not workers:  # (a worker process's warnings stay in its own stderr)
                assert stats["skipped_shards"] == len(msgs) and all("train-000001.tar" in m for m in msgs)
        assert skipped == expected >= 3  # at least once an epoch over all ranks and workers
        assert not {src for _, src, lab in delivered if lab != src % 10} and not changed & {s for _, s, _ in delivered}
        if verify == "start" or world * max(1, workers) == 1:
            assert not {i for i, _, _ in delivered} & set(range(8, 16))


@pytest.mark.parametrize("workers", [0, 2])
def test_verification_counts_are_the_same_after_resume(shards, tmp_path, workers):
    folder = copy_folder(shards[0], str(tmp_path / "resume"))
    relabel(folder, 3, 5)
    c = cfg(folder, num_workers=workers, shuffle_buffer=6, hflip=True)
    n = 25  # 100 samples: three epochs of the 32 good ones, and a bit

    def positions(loader, k):
        it, seq, stats = iter(loader), [], []
        for _ in range(k):
            seq += next(it)["index"].tolist()
            stats.append(dict(loader.stats))
        it.close()
        return seq, stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        full_seq, full_stats = positions(StreamingLoader(c, batch_size=4), n)
        assert 3 <= full_stats[-1]["skipped_shards"] <= 4
        for at in (1, 3, 6, 9, 14, 19, 23):
            first = StreamingLoader(c, batch_size=4)
            head_seq, head_stats = positions(first, at)
            second = StreamingLoader(c, batch_size=4)
            second.load_state_dict(json.loads(json.dumps(first.state_dict())))
            tail_seq, tail_stats = positions(second, n - at)
            assert head_seq + tail_seq == full_seq, f"resumed at {at}"
            assert head_stats + tail_stats == full_stats, f"resumed at {at}"


def test_samples_appended_to_a_shard_fail_its_verification(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "appended"))
    path = os.path.join(folder, "train-000004.tar")
    items = members(path)
    write_members(path, items)
    assert read_bytes(path) == read_bytes(os.path.join(shards[0], "train-000004.tar"))  # the helper is exact
    write_members(path, [*items, ("99999999.png", items[0][1]), ("99999999.cls", b"3")])
    got, stats, _ = run(StreamingLoader(cfg(folder, verify="off"), batch_size=1), N)
    assert stats["skipped_shards"] == 0  # the manifest's count is read; what follows goes unnoticed
    loader = StreamingLoader(cfg(folder), batch_size=1)
    got, stats, msgs = run(loader, N)
    assert not {i for i, _, _ in got} & set(range(32, 40))
    assert stats["skipped_shards"] == checks_passed(loader, 4) >= 1
    assert "train-000004.tar: its sha256" in msgs[0]


def test_the_evaluation_read_verifies_every_shard(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "eval"))
    relabel(folder, 0, 6)
    report = Report(strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(iter_split(folder, "train", report=report))
    assert [s.index for s in samples] == list(range(8, N))  # none of shard 0, not even its first samples
    assert all(s.label == int(s.key) % 10 for s in samples)
    assert (report.skipped_shards, report.skipped_samples) == (1, PER_SHARD)
    assert [str(w.message).count("train-000000.tar: its sha256") for w in caught] == [1]
    with pytest.raises(CorruptDataError, match=r"train-000000\.tar: its sha256"):
        list(split_batches(folder, "train", 4, report=Report(strict=True)))


def test_shards_without_a_manifest_sha256_are_read_unverified_and_said_so(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "nosha"))
    relabel(folder, 1, 2)
    manifest = json.loads(read_bytes(os.path.join(folder, "manifest.json")))
    del manifest["splits"]["train"]["shards"][1]["sha256"]
    write_bytes(os.path.join(folder, "manifest.json"), json.dumps(manifest).encode())
    for read in (lambda: run(StreamingLoader(cfg(folder), batch_size=1), N)[1],
                 lambda: list(iter_split(folder, "train"))):
        with pytest.warns(UserWarning, match=r"1 of 5 shards \(e\.g\. \S*train-000001\.tar\) have no "
                                             r"sha256 .*read unverified") as caught:
            read()
        assert not [w for w in caught if issubclass(w.category, CorruptDataWarning)]  # read, not skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verify=off: nothing to say
        StreamingLoader(cfg(folder, verify="off"), batch_size=1)


@pytest.mark.filterwarnings("ignore:data.verify=stream")  # the changed shard goes without a manifest sha256
def test_a_missing_or_foreign_label_in_a_labelled_split_is_a_counted_skip(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "labels"))
    path = os.path.join(folder, "train-000002.tar")
    items = members(path)
    no_cls, foreign = items[2 * 4][0].split(".")[0], items[2 * 6][0].split(".")[0]
    write_members(path, [(n, b"12" if n == f"{foreign}.cls" else d)
                         for n, d in items if n != f"{no_cls}.cls"])
    # the tar parses and every image decodes; verification would drop the changed shard, so it goes without a
    # manifest sha256 here (as with verify=off): the label checks are what is left then
    manifest = json.loads(read_bytes(os.path.join(folder, "manifest.json")))
    del manifest["splits"]["train"]["shards"][2]["sha256"]
    write_bytes(os.path.join(folder, "manifest.json"), json.dumps(manifest).encode())
    got, stats, msgs = run(StreamingLoader(cfg(folder), batch_size=1), N - 2)
    assert sorted(i for i, _, _ in got) == sorted(set(range(N)) - {16 + 4, 16 + 6})
    assert all(lab == src % 10 for _, src, lab in got)  # no label -1 (or 12) came out
    assert (stats["skipped_samples"], stats["skipped_shards"]) == (2, 0)
    assert any(f"key {no_cls}: has no .cls member, but the manifest says this split is labelled" in m
               for m in msgs)
    assert any(f"key {foreign}: label 12 is not one of the manifest's 10 classes" in m for m in msgs)
    with pytest.raises(CorruptDataError, match=rf"train-000002\.tar, key {no_cls}: has no \.cls member"):
        run(StreamingLoader(cfg(folder, strict=True), batch_size=1), N)
    # the evaluation read: the same skips
    report = Report(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(iter_split(folder, "train", report=report))
    assert len(samples) == N - 2 and all(s.label == int(s.key) % 10 for s in samples)
    assert (report.skipped_samples, report.skipped_shards) == (2, 0)
    with pytest.raises(CorruptDataError, match=rf"key {no_cls}: has no \.cls member"):
        list(iter_split(folder, "train", report=Report(strict=True)))


def test_an_unlabelled_split_still_streams_without_labels(tmp_path):
    folder, images = make_shards(str(tmp_path), 12, per_shard=4, labels=False)
    got, stats, _ = run(StreamingLoader(cfg(folder), batch_size=4), 3)
    assert {lab for _, _, lab in got} == {-1} and stats["skipped_samples"] == 0
    assert np.array_equal(np.sort([src for _, src, _ in got]), np.arange(12))
