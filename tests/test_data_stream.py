"""The streaming loader on real WebDataset tars written by prepare."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.stream import CorruptDataError, CorruptDataWarning, StreamingLoader
from tests.helpers.data import index_of, make_shards, run_gloo, to_u8

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
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_truncated_shard_is_counted_and_skipped(shards, tmp_path):
    folder = _copy_folder(shards[0], str(tmp_path / "trunc"))
    path = os.path.join(folder, "train-000002.tar")
    # keep 3 whole samples (each: png header+data block, cls header+data block) and cut into the 4th
    with open(path, "rb") as f:
        data = f.read()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut = members[6].offset_data + 10  # inside the 4th sample's png member
    with open(path, "wb") as f:
        f.write(data[:cut])
    loader = StreamingLoader(cfg(folder), batch_size=B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq = indices(take(loader, 12))  # 48 of the 53 - 5 readable samples
    msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
    assert len(msgs) == 1 and "train-000002.tar" in msgs[0] and "5 samples" in msgs[0]
    assert loader.stats["skipped_shards"] == 1 and loader.stats["skipped_samples"] == 5
    lost = set(range(2 * PER_SHARD + 3, 3 * PER_SHARD))
    assert not lost & set(seq) and len(set(seq)) == 48  # nothing repeated in what remains of the epoch
    strict = StreamingLoader(cfg(folder, strict=True), batch_size=B)
    with pytest.raises(CorruptDataError, match=r"train-000002\.tar.*data.strict=false"):
        take(strict, 14)


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
    loader = StreamingLoader(cfg(folder), batch_size=B)
    with pytest.warns(CorruptDataWarning, match=rf"train-000001\.tar, key {bad_key}: cannot decode"):
        seq = indices(take(loader, 13))
    assert loader.stats["skipped_samples"] == 1 and loader.stats["skipped_shards"] == 0
    assert len(set(seq[:N - 1])) == N - 1 and PER_SHARD + 2 not in seq[:N - 1]  # the bad one is sample 2 of shard 1
    with pytest.raises(CorruptDataError, match=bad_key):
        take(StreamingLoader(cfg(folder, strict=True), batch_size=B), 14)


def test_missing_shard_and_empty_list_fail_at_start(shards, tmp_path):
    folder = _copy_folder(shards[0], str(tmp_path / "missing"))
    os.remove(os.path.join(folder, "train-000003.tar"))
    with pytest.raises(FileNotFoundError, match=r"1 of 7 shards are missing, e\.g\. .*train-000003\.tar"):
        StreamingLoader(cfg(folder), batch_size=B)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StreamingLoader(cfg(str(tmp_path / "nowhere")), batch_size=B)
    with pytest.raises(ValueError, match="split 'test' is not in the manifest"):
        StreamingLoader(cfg(shards[0], split="test"), batch_size=B)
    with pytest.raises(ValueError, match="no manifest.json beside"):
        os.remove(os.path.join(folder, "manifest.json"))
        StreamingLoader(cfg(os.path.join(folder, "train-00000{0..2}.tar").replace(folder, "pipe:cat " + folder)),
                        batch_size=B)


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
