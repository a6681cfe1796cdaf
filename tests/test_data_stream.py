"""The streaming loader on real WebDataset tars written by prepare."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.loader import StreamingLoader
from pipeline.data.report import CorruptDataError, CorruptDataWarning, DataError
from tests.helpers.data import (
    copy_folder,
    cut_file,
    index_of,
    make_shards,
    member_spans,
    run_gloo,
    tar_keys,
    to_u8,
)

N, PER_SHARD, B = 53, 8, 4  # 7 shards (the last one holds 5): neither divisible by anything convenient


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("stream")), N, per_shard=PER_SHARD)


def take(loader, n_batches):
    it = iter(loader)
    out = [next(it) for _ in range(n_batches)]
    it.close()
    return out


def indices(batches):
    return [i for b in batches for i in b["index"].tolist()]


def cfg(folder, **kw):
    return DataConfig(shards=folder, **{"shuffle_buffer": 16, "num_workers": 0, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_each_sample_once_per_epoch_and_order_depends_on_seed_and_epoch(shards, workers):
    folder, _ = shards
    loader = StreamingLoader(cfg(folder, num_workers=workers), batch_size=B)
    assert loader.batches_per_epoch == -(-N // B) == 14
    seq = indices(take(loader, 3 * loader.batches_per_epoch))
    epochs = [seq[e * N:(e + 1) * N] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(N))  # every sample exactly once in each epoch window
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    again = indices(take(StreamingLoader(cfg(folder, num_workers=workers), batch_size=B), 14))
    assert again == seq[:56]  # a function of (seed, epoch)
    other = indices(take(StreamingLoader(cfg(folder, num_workers=workers, seed=1), batch_size=B), 14))
    assert other[:N] != seq[:N] and sorted(other[:N]) == list(range(N))


def test_images_labels_and_flip(shards):
    folder, images = shards
    # without flips the decoded tensor is exactly the source image, scaled to [-1, 1]
    for b in take(StreamingLoader(cfg(folder, hflip=False), batch_size=B), 3):
        assert b["image"].dtype.is_floating_point and b["image"].shape == (B, 3, 8, 8)
        assert float(b["image"].min()) >= -1.0 and float(b["image"].max()) <= 1.0
        for img, label in zip(to_u8(b["image"]), b["label"].tolist()):
            i = index_of(img)
            np.testing.assert_array_equal(img, images[i])
            assert label == i % 10
    # with flips each image is the source or its mirror, and both occur
    flipped = plain = 0
    for b in take(StreamingLoader(cfg(folder), batch_size=B), 14):
        for img in to_u8(b["image"]):
            src = images[index_of(img)]
            if np.array_equal(img, src):
                plain += 1
            else:
                np.testing.assert_array_equal(img, src[:, ::-1])
                flipped += 1
    assert flipped > 10 and plain > 10


def _check_images(batches, images):
    """Every image is its source (or the mirror), with the source's label; returns the flip count."""
    flipped = 0
    for b in batches:
        for img, label in zip(to_u8(b["image"]), b["label"].tolist()):
            src = images[index_of(img)]
            assert label == index_of(img) % 10
            if not np.array_equal(img, src):
                np.testing.assert_array_equal(img, src[:, ::-1])
                flipped += 1
    return flipped


@pytest.mark.parametrize("transfer", ["ring", "ring of one slot", "a buffer per batch"])
def test_worker_batches_cross_intact_and_stay_valid(shards, monkeypatch, transfer):
    import pipeline.data.transport as transport

    folder, images = shards
    reference = take(StreamingLoader(cfg(folder, num_workers=2), batch_size=B), 3 * 14)
    if transfer == "ring of one slot":  # each worker must wait until its previous batch was copied out
        monkeypatch.setattr(transport, "_ring_slots", lambda prefetch: 1)
    if transfer == "a buffer per batch":  # what batches too large for the ring, or of unknown size, take
        monkeypatch.setattr(transport, "_RING_MAX_BATCH_BYTES", 0)
    loader = StreamingLoader(cfg(folder, num_workers=2), batch_size=B)
    assert (loader._ring() is None) == (transfer == "a buffer per batch")
    batches = take(loader, 3 * 14)  # all kept: a reused slot must not change a batch already handed out
    assert 30 < _check_images(batches, images) < 3 * 14 * B - 30
    seq = indices(batches)
    assert all(sorted(seq[e * N:(e + 1) * N]) == list(range(N)) for e in range(3))
    for a, b in zip(batches, reference):
        assert a.keys() == b.keys() == {"image", "label", "index"}
        assert a["image"].shape == (B, 3, 8, 8) and a["image"].dtype == torch.float32
        assert a["label"].dtype == a["index"].dtype == torch.int64
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["index"], b["index"])


def test_unit_range_on_the_device_is_the_loaders_float_scaling_bit_for_bit():
    from pipeline.data.decode import to_unit_range, unit_range

    every = np.arange(256, dtype=np.uint8)
    want = to_unit_range(every, np.empty(256, np.float32))
    got = unit_range(torch.from_numpy(every)).numpy()
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert (got[0], got[255]) == (-1.0, 1.0)


@pytest.mark.parametrize("transfer", ["in process", "ring", "a buffer per batch"])
def test_uint8_batches_scaled_by_the_consumer_are_the_float_batches(shards, monkeypatch, transfer):
    """The trainer's input path: the loader hands uint8 batches over (a quarter of the bytes through the ring and
    to the GPU), the trainer scales them on its device; the values are the float loader's, bit for bit."""
    import pipeline.data.transport as transport
    from pipeline.data.decode import unit_range

    folder, _ = shards
    if transfer == "a buffer per batch":
        monkeypatch.setattr(transport, "_RING_MAX_BATCH_BYTES", 0)
    workers = 0 if transfer == "in process" else 2
    floats = take(StreamingLoader(cfg(folder, num_workers=workers), batch_size=B), 2 * 14)
    loader = StreamingLoader(cfg(folder, num_workers=workers), batch_size=B, uint8=True)
    if workers:
        assert (loader._ring() is None) == (transfer == "a buffer per batch")
        assert loader._ring() is None or loader._ring().buf.shape[2] == transport.batch_nbytes(B, 3, 8, 8, torch.uint8)
    for a, b in zip(take(loader, 2 * 14), floats, strict=True):
        assert a["image"].dtype == torch.uint8 and a["image"].shape == b["image"].shape
        assert unit_range(a["image"]).numpy().tobytes() == b["image"].numpy().tobytes()
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(shards, workers):
    folder, _ = shards
    full = take(StreamingLoader(cfg(folder, num_workers=workers), batch_size=B), 30)
    first = StreamingLoader(cfg(folder, num_workers=workers), batch_size=B)
    head = take(first, 9)  # mid-epoch; with workers the DataLoader has prefetched beyond this
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["batches"] == 9
    second = StreamingLoader(cfg(folder, num_workers=workers), batch_size=B)
    second.load_state_dict(state)
    tail = take(second, 21)
    assert indices(head + tail) == indices(full)
    for a, b in zip(head + tail, full):
        assert (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()  # flips too


def test_load_state_while_iterating_restarts_there(shards):
    folder, _ = shards
    loader = StreamingLoader(cfg(folder, num_workers=2), batch_size=B)
    it = iter(loader)
    seq = [next(it)["index"].tolist() for _ in range(6)]
    state = loader.state_dict()
    more = [next(it)["index"].tolist() for _ in range(3)]
    loader.load_state_dict(state)
    assert [next(it)["index"].tolist() for _ in range(3)] == more
    assert loader.stats["batches"] == 9 and len(seq) == 6


def test_resampled_mode_is_infinite_and_resumable(shards):
    folder, _ = shards
    c = cfg(folder, mode="resampled", num_workers=2)
    full = indices(take(StreamingLoader(c, batch_size=B), 40))
    assert len(full) == 160 and set(full) <= set(range(N))
    assert len(set(full)) > N // 2  # shards drawn with replacement cover most of the set
    first = StreamingLoader(c, batch_size=B)
    head = take(first, 11)
    second = StreamingLoader(c, batch_size=B)
    second.load_state_dict(first.state_dict())
    assert indices(head) + indices(take(second, 29)) == full


def test_brace_pattern_and_pipe_urls(shards):
    folder, _ = shards
    pattern = os.path.join(folder, "train-{000000..000006}.tar")
    by_folder = indices(take(StreamingLoader(cfg(folder), batch_size=B), 14))
    by_pattern = indices(take(StreamingLoader(cfg(pattern), batch_size=B), 14))
    assert by_pattern == by_folder  # the manifest beside the shards gives the same counts and order
    pipes = "::".join(f"pipe:cat {os.path.join(folder, f'train-{i:06d}.tar')}" for i in range(7))
    with pytest.warns(UserWarning, match=r"7 of 7 shards .* have no sha256 .* read unverified"):
        got = indices(take(StreamingLoader(cfg(pipes, mode="resampled"), batch_size=B), 10))
    assert len(got) == 40 and set(got) == {-1}  # no manifest: indices unknown, images still decoded


# --- two real gloo ranks x two DataLoader workers ------------------------------------------------


def _rank_run(rank, world_size, folders, n_batches, resume_at):
    out = []
    for folder in folders:
        def make(folder=folder):
            return StreamingLoader(cfg(folder, num_workers=2), batch_size=B, rank=rank, world_size=world_size)

        full = take(make(), n_batches[folder])
        first = make()
        head = take(first, resume_at[folder])  # the DataLoader workers have prefetched beyond this
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        tail = take(resumed, n_batches[folder] - resume_at[folder])
        out.append({"bpe": first.batches_per_epoch,
                    "batches": [b["index"].tolist() for b in full],
                    "resumed": [b["index"].tolist() for b in head + tail]})
    return out


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_exactly_once(tmp_path):
    # 4 shards of 8 (divisible by 2 ranks x 2 workers) and 7 shards holding 53 samples (not divisible)
    sets = {32: make_shards(str(tmp_path), 32, per_shard=PER_SHARD, name="even")[0],
            N: make_shards(str(tmp_path), N, per_shard=PER_SHARD, name="odd")[0]}
    assert [len([f for f in os.listdir(d) if f.endswith(".tar")]) for d in sets.values()] == [4, 7]
    bpe = {d: -(-n // (B * 2)) for n, d in sets.items()}
    n_batches = {d: 2 * bpe[d] for d in sets.values()}
    resume_at = {d: bpe[d] // 2 + 1 for d in sets.values()}
    results = run_gloo(_rank_run, 2, (list(sets.values()), n_batches, resume_at), str(tmp_path))
    for j, (n, folder) in enumerate(sets.items()):
        r0, r1 = results[0][j], results[1][j]
        assert r0["bpe"] == r1["bpe"] == bpe[folder]
        assert len(r0["batches"]) == len(r1["batches"]) == n_batches[folder]  # equal batch counts
        # global position order: batch k of rank r is global batch 2k + r
        seq = [i for k in range(n_batches[folder]) for r in (r0, r1) for i in r["batches"][k]]
        assert sorted(seq[:n]) == list(range(n)) and sorted(seq[n:2 * n]) == list(range(n))
        assert seq[:n] != seq[n:2 * n]
        # mid-epoch resume on both ranks continues the same stream, sample by sample
        assert r0["resumed"] == r0["batches"] and r1["resumed"] == r1["batches"]


# --- bad data and bad configuration ----------------------------------------------------------------


def _copy_folder(src, dst):
    return copy_folder(src, dst)


def _positions_run(loader, n_batches):
    """Indices of n batches and the loader's stats after each one."""
    it = iter(loader)
    seq, stats = [], []
    for _ in range(n_batches):
        seq += next(it)["index"].tolist()
        stats.append(dict(loader.stats))
    it.close()
    return seq, stats


def _expected_stats(intact, lost, first_lost, delivered_count):
    """Stats after each delivered sample (B=1, one stream), from the intact run's position order.

    A lost sample is counted when the stream passes its position; a shard when the stream passes its
    first lost sample. So after the m-th delivered sample, at intact position p_m, the counts are the
    lost positions (and first-lost positions) before p_m.
    """
    out, skipped_samples, skipped_shards = [], 0, 0
    for i in intact:
        if i in lost:
            skipped_samples += 1
            skipped_shards += i == first_lost
            continue
        out.append({"skipped_samples": skipped_samples, "skipped_shards": skipped_shards})
        if len(out) == delivered_count:
            break
    return out


# cut points in shard 2 (samples in manifest order 16..23; members: png, cls per sample), and how many
# of its samples are whole before the cut. A sample must be kept when, and only when, it is whole.
CUTS = {
    "inside the 4th png's data": (lambda m: m[6][2] + 10, 3),
    "inside the 4th png's header": (lambda m: m[6][1] + 100, 3),
    "at the header boundary before the 4th sample": (lambda m: m[6][1], 3),
    "at the header boundary between the 4th png and its cls": (lambda m: m[7][1], 3),
    "inside the 4th cls's header": (lambda m: m[7][1] + 300, 3),
    "at the 4th cls's data (0 of its bytes)": (lambda m: m[7][2], 3),
    "inside the first header": (lambda m: 100, 0),
    "after the last member, before the end-of-archive block": (lambda m: m[15][2] + 512, 8),
}


@pytest.fixture(scope="module")
def intact_order(shards):
    """Index order of two epochs, B=1, no shuffle, no flip: the reference for the cut runs."""
    loader = StreamingLoader(cfg(shards[0], shuffle_buffer=0, hflip=False), batch_size=1)
    return _positions_run(loader, 2 * N)[0]


@pytest.mark.parametrize("verify", ["off", "stream"])
@pytest.mark.parametrize("where", list(CUTS))
def test_truncated_shard_keeps_every_whole_sample(shards, intact_order, tmp_path, where, verify):
    # verify=off: the tar-level policy (every whole sample before the cut is kept). verify=stream: the one
    # stream reads the shard to its end, so a file that cannot be verified (or differs) loses all of it.
    offset, kept = CUTS[where]
    folder = copy_folder(shards[0], str(tmp_path / "cut"))
    path = os.path.join(folder, "train-000002.tar")
    spans = member_spans(path)
    cut_file(path, offset(spans))
    lost = set(range(2 * PER_SHARD + (kept if verify == "off" else 0), 3 * PER_SHARD))
    expected = [i for i in intact_order if i not in lost]  # two epochs, order unchanged but for the lost
    loader = StreamingLoader(cfg(folder, shuffle_buffer=0, hflip=False, verify=verify), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(loader)
        got, labels, sources, stats = [], [], [], []
        for _ in expected:
            b = next(it)
            got += b["index"].tolist()
            labels += b["label"].tolist()
            sources += [index_of(img) for img in to_u8(b["image"])]
            stats.append({k: loader.stats[k] for k in ("skipped_samples", "skipped_shards")})
        it.close()
    assert got == expected  # exactly the whole samples, each epoch
    assert labels == [i % 10 for i in sources]  # none came out without its cls member (label -1)
    carrier = 2 * PER_SHARD + min(kept, PER_SHARD - 1)  # the failing sample (a cut after the last: the last)
    assert stats == _expected_stats(intact_order, lost, carrier if lost else None, len(expected))
    msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
    if not lost:
        assert msgs == [] and stats[-1] == {"skipped_samples": 0, "skipped_shards": 0}
        return
    assert stats[-1]["skipped_shards"] <= 2 and stats[-1]["skipped_samples"] <= 2 * len(lost)
    after = f"after key {spans[2 * kept - 1][0].split('.')[0]}" if kept else "before its first sample"
    assert len(msgs) == stats[-1]["skipped_shards"] >= 1  # one warning per counted shard, once an epoch
    skipping = f"({len(lost)} of {PER_SHARD})" if verify == "off" else f"all {PER_SHARD} of its samples"
    assert all("train-000002.tar" in m and after in m and skipping in m for m in msgs)
    strict = StreamingLoader(cfg(folder, strict=True), batch_size=B)
    with pytest.raises(CorruptDataError, match=r"train-000002\.tar.*data.strict=false"):
        take(strict, 14)


def _truncated_copy(shards, tmp_path, name="trunc"):
    folder = copy_folder(shards[0], str(tmp_path / name))
    path = os.path.join(folder, "train-000002.tar")
    cut_file(path, member_spans(path)[6][2] + 10)  # samples 0..2 whole, 3..7 (indices 19..23) lost
    return folder


@pytest.mark.parametrize(("workers", "verify"), [(0, "off"), (2, "off"), (0, "stream")])
def test_skip_counts_are_the_same_after_resume(shards, tmp_path, workers, verify):
    folder = _truncated_copy(shards, tmp_path)
    c = cfg(folder, num_workers=workers, verify=verify)
    n = 30  # 120 samples: 2.5 epochs of the 48 (verify=off) or 45 readable ones
    lost = 5 if verify == "off" else PER_SHARD  # a verifying read loses the whole shard
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        full_seq, full_stats = _positions_run(StreamingLoader(c, batch_size=B), n)
        # one shard and its lost samples per epoch, never more: 2 whole epochs passed, the third partly
        assert 2 <= full_stats[-1]["skipped_shards"] <= 3
        assert 2 * lost <= full_stats[-1]["skipped_samples"] <= 3 * lost
        for at in ([1, 3, 5, 8, 11, 13, 17, 22, 27] if workers else range(1, n)):
            first = StreamingLoader(c, batch_size=B)
            head_seq, head_stats = _positions_run(first, at)
            state = json.loads(json.dumps(first.state_dict()))
            second = StreamingLoader(c, batch_size=B)
            second.load_state_dict(state)
            tail_seq, tail_stats = _positions_run(second, n - at)
            assert head_seq + tail_seq == full_seq
            assert head_stats + tail_stats == full_stats, f"resumed after batch {at}"


def test_a_shard_split_between_streams_is_counted_once_per_epoch(tmp_path):
    # 3 shards of 8 on 2 ranks: each rank's stream reads half of each epoch's shard sequence, so the
    # shard in the middle of the order is split between the ranks. Cut after its 2nd sample, both
    # halves lose samples, but the shard must count once per epoch over both ranks.
    # (verify=off: the tar-level policy; tests/test_data_verify.py has the verifying read of a split shard)
    folder, _ = make_shards(str(tmp_path), 24, per_shard=8, name="three")
    intact = {r: _positions_run(StreamingLoader(cfg(folder, shuffle_buffer=0, hflip=False), batch_size=1,
                                                rank=r, world_size=2), 6 * 12)[0] for r in (0, 1)}
    bad = copy_folder(folder, str(tmp_path / "bad"))
    path = os.path.join(bad, "train-000001.tar")
    cut_file(path, member_spans(path)[4][1] + 50)  # inside the 3rd sample's header: samples 8, 9 whole
    lost = set(range(10, 16))
    split_epochs = [e for e in range(6) if all(lost & set(intact[r][12 * e:12 * (e + 1)]) for r in (0, 1))]
    assert split_epochs  # the scenario happens (epochs where both ranks lose part of the shard)
    totals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        for r in (0, 1):
            expected = [i for i in intact[r] if i not in lost]
            loader = StreamingLoader(cfg(bad, shuffle_buffer=0, hflip=False, verify="off"), batch_size=1,
                                     rank=r, world_size=2)
            seq, stats = _positions_run(loader, len(expected))
            assert seq == expected
            # the shard is counted by the rank whose half holds its first lost sample (index 10)
            want = _expected_stats(intact[r], lost, 10, len(expected))
            assert [{k: s[k] for k in want[0]} for s in stats] == want
            totals.append(stats[-1]["skipped_shards"])
    # over both ranks: once per epoch, also in the epochs it was split (the last epoch's count may
    # still be pending when a rank's last lost samples lie after its last delivered one)
    assert sum(totals) in (5, 6)


def test_corrupt_png_is_counted_and_skipped(shards, tmp_path):
    folder = _copy_folder(shards[0], str(tmp_path / "corrupt"))
    path = os.path.join(folder, "train-000001.tar")
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    bad_key = members[4][0].name.split(".")[0]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == f"{bad_key}.png":
                data = data[:20] + b"\x00" * (len(data) - 20)  # valid signature, garbage chunks
            tf.addfile(m, io.BytesIO(data))
    loader = StreamingLoader(cfg(folder, verify="off"), batch_size=B)  # (verify=stream drops the shard)
    with pytest.warns(CorruptDataWarning, match=rf"train-000001\.tar, key {bad_key}: cannot decode"):
        seq = indices(take(loader, 13))
    assert loader.stats["skipped_samples"] == 1 and loader.stats["skipped_shards"] == 0
    assert len(set(seq[:N - 1])) == N - 1 and PER_SHARD + 2 not in seq[:N - 1]  # the bad one is sample 2 of shard 1
    with pytest.raises(CorruptDataError, match=bad_key):
        take(StreamingLoader(cfg(folder, strict=True, verify="off"), batch_size=B), 14)


def test_missing_shard_and_empty_list_fail_at_start(shards, tmp_path):
    folder = _copy_folder(shards[0], str(tmp_path / "missing"))
    os.remove(os.path.join(folder, "train-000003.tar"))
    with pytest.raises(DataError, match=r"1 of 7 shards of data.shards=.* missing: \S*train-000003\.tar;"):
        StreamingLoader(cfg(folder), batch_size=B)
    with pytest.raises(DataError, match="does not exist"):
        StreamingLoader(cfg(str(tmp_path / "nowhere")), batch_size=B)
    with pytest.raises(DataError, match="split 'test' is not in the manifest"):
        StreamingLoader(cfg(shards[0], split="test"), batch_size=B)
    with pytest.raises(DataError, match="no manifest.json beside"):
        os.remove(os.path.join(folder, "manifest.json"))
        StreamingLoader(cfg(os.path.join(folder, "train-00000{0..2}.tar").replace(folder, "pipe:cat " + folder)),
                        batch_size=B)


@pytest.mark.filterwarnings("ignore:data.verify=stream")  # no manifest: said, and tested elsewhere
def test_missing_local_shard_in_a_pattern_fails_at_start_naming_it(shards, tmp_path):
    folder = copy_folder(shards[0], str(tmp_path / "pattern"))
    os.remove(os.path.join(folder, "train-000003.tar"))
    for prefix in ("", "file://"):
        pattern = prefix + os.path.join(folder, "train-{000000..000006}.tar")
        with pytest.raises(DataError, match=r"1 of 7 shards .* are missing: \S*train-000003\.tar;"):
            StreamingLoader(cfg(pattern), batch_size=B)
        with pytest.raises(DataError, match=r"3 of 9 shards .*missing: .*000003\.tar, .*000007\.tar, "
                                                    r".*000008\.tar;"):
            StreamingLoader(cfg(pattern.replace("000006", "000008"), mode="resampled"), batch_size=B)
    # without a manifest exact mode counts local shards at start: a truncated one fails there, named
    os.remove(os.path.join(folder, "manifest.json"))
    shutil.copy(os.path.join(shards[0], "train-000003.tar"), folder)
    pattern = os.path.join(folder, "train-{000000..000006}.tar")
    assert StreamingLoader(cfg(pattern), batch_size=B).num_samples == N
    for cut in (lambda m: m[6][1], lambda m: m[6][1] + 100, lambda m: m[6][2] + 10):  # boundary, header, data
        path = os.path.join(folder, "train-000002.tar")
        shutil.copy(os.path.join(shards[0], "train-000002.tar"), path)
        cut_file(path, cut(member_spans(path)))
        with pytest.raises(CorruptDataError, match=r"000002\.tar is unreadable \(TruncatedTar: .*mode="):
            StreamingLoader(cfg(pattern), batch_size=B)
    with pytest.raises(ValueError, match=r"uses nosuchproto:// URLs, which fsspec cannot open"):
        StreamingLoader(cfg("nosuchproto://bucket/train-{000000..000001}.tar", mode="resampled"), batch_size=B)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:data.verify=stream")  # no manifest: said, and tested elsewhere
def test_failing_pipe_command_is_counted_and_skipped_not_hung(shards):
    folder, images = shards
    good = [f"pipe:cat {os.path.join(folder, f'train-{i:06d}.tar')}" for i in (0, 1)]
    bad = "pipe:cat /nonexistent/train-000009.tar"
    c = cfg("::".join([*good, bad]), mode="resampled")
    loader = StreamingLoader(c, batch_size=B)  # pipe: commands are checked when opened, not at start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(loader, 15)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
    sources = [index_of(img) for b in batches for img in to_u8(b["image"])]
    in_good = {int(k) for i in (0, 1) for k in tar_keys(os.path.join(folder, f"train-{i:06d}.tar"))}
    assert len(sources) == 60 and set(sources) <= in_good  # full batches, all from the good shards
    assert [lab for b in batches for lab in b["label"].tolist()] == [i % 10 for i in sources]
    # each failed draw of the bad shard: one warning naming the command and its exit status, one count
    assert loader.stats["skipped_shards"] == len(msgs) >= 1 and loader.stats["skipped_samples"] == 0
    assert all(bad in m and "exit 1" in m for m in msgs)
    with pytest.raises(CorruptDataError, match=r"nonexistent/train-000009\.tar.*exit 1"):
        take(StreamingLoader(cfg("::".join([*good, bad]), mode="resampled", strict=True), batch_size=B), 15)
    # nothing readable at all: an error naming the failure, after a bounded number of draws
    with warnings.catch_warnings(), pytest.raises(CorruptDataError, match=r"no readable sample in 10 shard "
                                                                          r"draws.*nonexistent.*exit 1"):
        warnings.simplefilter("ignore", CorruptDataWarning)
        take(StreamingLoader(cfg(bad, mode="resampled"), batch_size=B), 1)


def test_unreachable_remote_shard_is_counted_once_per_epoch(shards):
    import fsspec

    folder, _ = shards
    fs = fsspec.filesystem("memory")  # a real fsspec backend, in process
    root = f"/shards-{os.getpid()}"
    for f in os.listdir(folder):
        if f != "train-000004.tar":  # listed in the manifest, absent from the store
            with open(os.path.join(folder, f), "rb") as src:
                fs.pipe(f"{root}/{f}", src.read())
    try:
        pattern = f"memory://{root}/train-{{000000..000006}}.tar"
        loader = StreamingLoader(cfg(pattern, shuffle_buffer=0, hflip=False), batch_size=1)  # no check at start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seq, stats = _positions_run(loader, 2 * (N - PER_SHARD))
        lost = set(range(4 * PER_SHARD, 5 * PER_SHARD))
        assert sorted(seq[:N - PER_SHARD]) == sorted(set(range(N)) - lost)
        assert sorted(seq[N - PER_SHARD:]) == sorted(set(range(N)) - lost)
        msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
        assert stats[-1]["skipped_shards"] == len(msgs) in (1, 2)  # once an epoch (the 2nd may be pending)
        assert all("train-000004.tar" in m and "FileNotFoundError" in m for m in msgs)
        with pytest.raises(CorruptDataError, match=r"train-000004\.tar.*FileNotFoundError"):
            take(StreamingLoader(cfg(pattern, strict=True), batch_size=B), 14)
    finally:
        fs.rm(root, recursive=True)


def test_invalid_config_names_the_key(shards):
    with pytest.raises(ConfigError, match=r"data\.mode='bogus'.*'exact', 'resampled'"):
        load_config(overrides=["data.shards=x", "data.mode=bogus"])
    with pytest.raises(ConfigError, match=r"data\.shuffle_buffer"):
        DataConfig(shards="x", shuffle_buffer=-1)
    with pytest.raises(ValueError, match="batch_size=0"):
        StreamingLoader(cfg(shards[0]), batch_size=0)
    with pytest.raises(ValueError, match="rank=2"):
        StreamingLoader(cfg(shards[0]), batch_size=B, rank=2, world_size=2)
    loader = StreamingLoader(cfg(shards[0]), batch_size=B)
    bad = {**loader.state_dict(), "seed": 5}
    with pytest.raises(ValueError, match="same data.shards, data.mode and data.seed"):
        loader.load_state_dict(bad)


def test_layout_change_on_resume_continues_at_next_epoch(shards):
    folder, _ = shards
    first = StreamingLoader(cfg(folder), batch_size=B)
    take(first, 5)  # inside epoch 0
    other = StreamingLoader(cfg(folder), batch_size=2)  # a different per-rank batch: positions differ
    with pytest.warns(UserWarning, match="continuing at the start of epoch 1"):
        other.load_state_dict(first.state_dict())
    seq = indices(take(other, -(-N // 2)))
    assert sorted(seq[:N]) == list(range(N))  # a whole epoch, exactly once
    assert other.epoch >= 1
