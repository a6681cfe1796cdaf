"""prepare's sample index: a stream reads only its piece of a shard, each byte once per epoch, every byte checked.

The index gives each sample's byte range and sha256 (pipeline/data/index.py), covered by the manifest's hash.
The byte counts come from the reader itself (pipeline.data.tar.READ): the plan and the reader are driven
in-process for every stream of a 64-rank x 4-worker layout, without starting 64 processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.index import decode
from pipeline.data.loader import StreamingLoader
from pipeline.data.manifest import ManifestError, read_manifest
from pipeline.data.plan import Plan
from pipeline.data.report import CorruptDataWarning, DataError, Report
from pipeline.data.samples import decode_sample, read_piece
from pipeline.data.sequential import iter_split
from tests.helpers.corrupt import read_bytes, write_bytes
from tests.helpers.data import copy_folder, index_of, make_shards, member_spans, to_u8

BIG_N, BIG_PER_SHARD = 50_000, 1000  # CIFAR-10's shape: 50 shards of 1,000 samples
RANKS, WORKERS, MICRO_BATCH = 64, 4, 4
OLD_N, OLD_PER_SHARD = 2_000, 200  # shards without an index


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """50 shards x 1,000 tiny samples (8x8 grey, raw u8: quick to prepare, the tar layout of any data set)."""
    folder, _ = make_shards(str(tmp_path_factory.mktemp("big")), BIG_N, per_shard=BIG_PER_SHARD, channels=1,
                            encoding="u8", labels=False)
    return folder


def epoch_read(shards: str, ranks: int = RANKS, workers: int = WORKERS,
               shuffle_buffer: int = 1000) -> tuple[int, int, list[int]]:
    """(bytes the reader read, bytes of the shards, positions delivered) for epoch 0 of every stream of a
    ranks x workers layout: the loader's own plan and reader, in this process."""
    from pipeline.data.tar import READ

    loader = StreamingLoader(DataConfig(shards=shards, num_workers=workers, shuffle_buffer=shuffle_buffer),
                             batch_size=MICRO_BATCH, rank=0, world_size=ranks)
    shardset, plan = loader.shardset, loader.plan
    report = Report(strict=True)
    delivered: list[int] = []
    READ.reset()
    for stream in range(plan.T):
        for g in plan.epoch_groups(stream, 0):
            for i, base, lo, hi in g.runs:
                delivered += [raw.index for raw in read_piece(shardset.shards[i], base, lo, hi, report, shardset)]
    size = sum(shardset.index[s.url].size if s.url in shardset.index else os.path.getsize(s.url)
               for s in shardset.shards)  # the index records each shard's size (a local one: as on disk)
    return READ.bytes, size, delivered


def strip_index(folder: str) -> str:
    """The folder as prepare wrote it before the index existed: no index files, no "index" entries."""
    path = os.path.join(folder, "manifest.json")
    manifest = json.loads(read_bytes(path))
    for split in manifest["splits"].values():
        os.remove(os.path.join(folder, split.pop("index")["name"]))
    write_bytes(path, json.dumps(manifest, indent=1).encode())
    return folder


def test_prepare_records_each_samples_bytes_and_sha256_covered_by_the_manifest(tmp_path):
    folder, _ = make_shards(str(tmp_path), 20, per_shard=8, test_fraction=0.25)
    m = read_manifest(folder)
    for split, entry in m.raw["splits"].items():
        info = entry["index"]
        data = read_bytes(os.path.join(folder, info["name"]))
        assert info["name"] == f"{split}-index.safetensors"
        assert hashlib.sha256(data).hexdigest() == info["sha256"]  # the manifest covers the index
        indexes = decode(bytes(data), {s.name: s.num_samples for s in m.splits[split]}, info["name"])
        for shard in m.splits[split]:
            ix, raw = indexes[shard.name], read_bytes(shard.url)
            assert ix.offsets[0] == 0 and ix.size == len(raw)  # the ranges tile the whole file
            firsts = [off for name, off, _ in member_spans(shard.url) if name.endswith(".png")]
            assert list(ix.offsets[:-1]) == firsts  # each range starts at its sample's first header
            for k in range(shard.num_samples):  # ... and the index covers every byte
                assert hashlib.sha256(raw[ix.offsets[k]:ix.offsets[k + 1]]).digest() == ix.digests[k].tobytes()
            with tarfile.open(shard.url) as tf:
                assert len(tf.getmembers()) == 2 * shard.num_samples


def test_each_byte_is_read_once_per_epoch_at_64_ranks_x_4_workers(big, tmp_path):
    read, size, delivered = epoch_read(big)
    assert size == sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big) if f.endswith(".tar"))
    assert sorted(delivered) == list(range(BIG_N))  # every sample once, verified (strict: nothing skipped)
    assert size <= read <= 1.05 * size, read / size  # each byte once: pieces tile the shards
    # shards prepared before the index existed: each stream reads from the shard's first byte, with a note (a
    # smaller set, the same layout: read from the start, 50,000 samples cost ~1,000 times their bytes, 2 minutes)
    (tmp_path / "old").mkdir()
    old, _ = make_shards(str(tmp_path / "old"), OLD_N, per_shard=OLD_PER_SHARD, channels=1, encoding="u8",
                         labels=False)
    strip_index(old)
    with pytest.warns(UserWarning, match=r"10 of 10 shards .* have no sample index .* re-run prepare to read each "
                                         r"byte once") as notes:
        read_old, size_old, delivered_old = epoch_read(old)
    assert len([w for w in notes if "sample index" in str(w.message)]) == 1
    assert sorted(delivered_old) == list(range(OLD_N))
    assert size_old == sum(os.path.getsize(os.path.join(old, f)) for f in os.listdir(old) if f.endswith(".tar"))
    assert read_old > 2 * size_old, read_old / size_old  # what the index saves at this layout


def test_old_shards_without_an_index_stream_the_same_samples(tmp_path):
    folder, _ = make_shards(str(tmp_path), 53, per_shard=8)
    old = strip_index(copy_folder(folder, str(tmp_path / "old")))

    def run(shards, rank):
        loader = StreamingLoader(DataConfig(shards=shards, num_workers=0, shuffle_buffer=16), batch_size=4,
                                 rank=rank, world_size=2)
        it = iter(loader)
        out = [(b["index"].tolist(), to_u8(b["image"]).tobytes()) for b in (next(it) for _ in range(20))]
        it.close()
        return out

    for rank in (0, 1):
        with pytest.warns(UserWarning, match="no sample index"):
            before = run(old, rank)
        assert run(folder, rank) == before  # the same batches, bit for bit, resume state aside
    assert [s.index for s in iter_split(old, "train")] == list(range(53))


def test_a_changed_byte_inside_a_piece_is_caught_by_the_stream_that_reads_it(tmp_path):
    # 8 ranks, batch 2, 3 shards of 16: shards are split between streams. Change one label inside a piece that
    # starts after its shard's first byte and ends before its last: a read from the first byte, or a check of
    # the whole file by the stream at the shard's end, would not see this piece's bytes.
    folder, _ = make_shards(str(tmp_path), 48, per_shard=16, name="intact")
    world, B = 8, 2
    plan = Plan([16] * 3, B, world, 1, 0, window=0)
    inner = [(s, i, lo, hi) for s in range(world) for i, _, lo, hi in _reads(plan, s)
             if lo > 0 and hi < 16 and hi - lo >= 2]
    assert inner, "the layout splits no shard into a middle piece"
    stream, shard, lo, hi = inner[0]
    bad = copy_folder(folder, str(tmp_path / "bad"))
    path = os.path.join(bad, f"train-{shard:06d}.tar")
    name, _, at = member_spans(path)[2 * lo + 1]  # sample lo's .cls (members: png, cls per sample)
    data = read_bytes(path)
    data[at] = ord(str((int(chr(data[at])) + 1) % 10))  # same length: the tar still parses
    write_bytes(path, data)
    key = int(name.split(".")[0])

    # epoch 0 of every stream, through the loader's reader and decoder (skips counted and warned on emission)
    shardset = StreamingLoader(DataConfig(shards=bad, num_workers=0), batch_size=B, world_size=world).shardset
    got = {}
    for s in range(world):
        report = Report(strict=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, base, plo, phi in _reads(plan, s):
                for raw in read_piece(shardset.shards[i], base, plo, phi, report, shardset):
                    if (sample := decode_sample(raw, shardset, report)) is not None:
                        got[raw.index] = (int(raw.key), sample[1])
        msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
        if s == stream:
            assert len(msgs) == 1 and f"train-{shard:06d}.tar: its sha256 of sample {lo} (key {key:08d})" in msgs[0]
            assert f"its samples {lo}..{hi - 1} (this stream's piece)" in msgs[0]
            assert (report.skipped_samples, report.skipped_shards) == (hi - lo, 1)
        else:
            assert msgs == [] and (report.skipped_samples, report.skipped_shards) == (0, 0)
    piece = set(range(16 * shard + lo, 16 * shard + hi))
    assert set(got) == set(range(48)) - piece  # the rest of the shard is delivered: its bytes are intact
    assert all(label == src % 10 for src, label in got.values())  # the changed label never comes out
    # without verification the changed label is trained on: the check above is what stops it
    loader = StreamingLoader(DataConfig(shards=bad, num_workers=0, shuffle_buffer=0, hflip=False, verify="off"),
                             batch_size=B, rank=stream, world_size=world)
    it = iter(loader)
    labels = {src: lab for b in (next(it) for _ in range(loader.batches_per_epoch))
              for src, lab in zip((index_of(x) for x in to_u8(b["image"])), b["label"].tolist())}
    it.close()
    assert labels[key] == (key + 1) % 10


def _reads(plan: Plan, stream: int) -> list[tuple[int, int, int, int]]:
    """The reads (shard, base, lo, hi) of a stream's epoch 0."""
    return [run for g in plan.epoch_groups(stream, 0) for run in g.runs]


def test_a_tampered_or_missing_index_is_refused_at_start(tmp_path):
    folder, _ = make_shards(str(tmp_path), 16, per_shard=8, name="intact")
    tampered = copy_folder(folder, str(tmp_path / "tampered"))
    index = os.path.join(tampered, "train-index.safetensors")
    data = read_bytes(index)
    data[-1] ^= 1
    write_bytes(index, data)
    for make in (lambda f: StreamingLoader(DataConfig(shards=f, num_workers=0), batch_size=4),
                 lambda f: list(iter_split(f, "train"))):
        with pytest.raises(ManifestError, match=r"train-index\.safetensors: its sha256 .* differs from the "
                                                r"manifest's .*re-run prepare") as err:
            make(tampered)
        assert len(str(err.value).splitlines()) == 1
    missing = copy_folder(folder, str(tmp_path / "missing"))
    os.remove(os.path.join(missing, "train-index.safetensors"))
    with pytest.raises(ManifestError, match=r"names the sample index \S+train-index\.safetensors, which is missing"):
        StreamingLoader(DataConfig(shards=missing, num_workers=0), batch_size=4)


def test_a_manifest_named_by_url_gives_pipe_lists_exact_mode(tmp_path):
    folder, _ = make_shards(str(tmp_path), 53, per_shard=8)
    pipes = "::".join(f"pipe:cat {os.path.join(folder, f'train-{i:06d}.tar')}" for i in range(7))
    with pytest.raises(DataError, match=r"data.mode=exact needs per-shard sample counts.*data\.manifest=URL"):
        StreamingLoader(DataConfig(shards=pipes, num_workers=0), batch_size=4)
    manifest = f"file://{os.path.join(folder, 'manifest.json')}"

    def epoch(shards, **kw):
        loader = StreamingLoader(DataConfig(shards=shards, num_workers=0, **kw), batch_size=4)
        it = iter(loader)
        out = [(b["index"].tolist(), to_u8(b["image"]).tobytes(), b["label"].tolist()) for b in
               (next(it) for _ in range(2 * loader.batches_per_epoch))]
        it.close()
        return out, loader

    via_pipes, loader = epoch(pipes, manifest=manifest)
    assert loader.num_samples == 53 and all(s.sha256 for s in loader.shardset.shards)
    assert len(loader.shardset.index) == 7  # pieces are cut out of the commands' output
    assert via_pipes == epoch(folder)[0]  # the folder's exact epochs, bit for bit
    # verified as read, sample by sample: a changed label in a shard behind a command is caught
    bad = copy_folder(folder, str(tmp_path / "bad"))
    path = os.path.join(bad, "train-000003.tar")
    _, _, at = member_spans(path)[2 * 5 + 1]
    data = read_bytes(path)
    data[at] = ord(str((int(chr(data[at])) + 1) % 10))
    write_bytes(path, data)
    with pytest.warns(CorruptDataWarning, match=r"pipe:cat \S+train-000003\.tar: its sha256 of sample 5"):
        got, loader = epoch(pipes.replace(folder, bad), manifest=manifest)
    assert loader.stats["skipped_shards"] >= 1 and 24 + 5 not in {i for idx, _, _ in got for i in idx}
    with pytest.raises(DataError, match=r"data\.manifest=.* is for shard patterns and URL lists"):
        StreamingLoader(DataConfig(shards=folder, manifest=manifest, num_workers=0), batch_size=4)
    shutil.rmtree(bad)


def test_index_helpers_are_exact_about_bounds():
    from pipeline.data.index import ShardIndex, encode

    ix = ShardIndex(np.array([0, 1024, 2048, 12288]), np.zeros((3, 32), np.uint8))
    data = encode({"train-000000.tar": ix})
    assert encode({"train-000000.tar": ix}) == data  # byte-identical
    assert decode(data, {"train-000000.tar": 3}, "x")["train-000000.tar"].size == 12288
    with pytest.raises(ManifestError, match="does not describe its 4 samples"):
        decode(data, {"train-000000.tar": 4}, "x")
    with pytest.raises(ManifestError, match="no entry for shard train-000001.tar"):
        decode(data, {"train-000001.tar": 3}, "x")
