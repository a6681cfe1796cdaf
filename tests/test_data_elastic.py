"""Elastic exact epochs: one global sample order whatever the layout, and a mid-epoch resume on another layout.

Every rank of a layout is a StreamingLoader in this process (DataLoader workers are real processes); the
global sequence is what a training step sees: for each step, every rank's micro-batches in rank order.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.plan import Plan
from pipeline.data.report import CorruptDataWarning
from tests.helpers.corrupt import read_bytes, write_bytes
from tests.helpers.data import copy_folder, make_shards, member_spans

N, PER_SHARD, G = 101, 16, 12  # 7 shards (the last one holds 5); a global batch 1, 2, 3 and 4 ranks divide
BUFFER = 24  # shuffle windows of 24: 5 per epoch, the last one shorter


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder, _ = make_shards(str(tmp_path_factory.mktemp("elastic")), N, per_shard=PER_SHARD, channels=1,
                            encoding="u8", labels=False)
    return folder


class Layout:
    """`world` ranks with `workers` DataLoader workers each, splitting the global batch G evenly."""

    def __init__(self, folder: str, world: int, workers: int, **kw):
        self.world = world
        self.loaders = [StreamingLoader(DataConfig(shards=folder, num_workers=workers, shuffle_buffer=BUFFER, **kw),
                                        batch_size=G // world, rank=r, world_size=world) for r in range(world)]
        self.iters = None

    def steps(self, n: int) -> list[int]:
        """The sample indices of the next n steps' global batches (ranks in order)."""
        if self.iters is None:
            self.iters = [iter(lo) for lo in self.loaders]
        return [i for _ in range(n) for it in self.iters for i in next(it)["index"].tolist()]

    def state(self) -> dict:
        return StreamingLoader.merge_states([lo.state_dict() for lo in self.loaders])

    def close(self) -> None:
        for it in self.iters or []:
            it.close()


def reference(folder: str, steps: int) -> list[int]:
    one = Layout(folder, 1, 0)
    try:
        return one.steps(steps)
    finally:
        one.close()


def test_the_global_order_is_the_same_for_1_2_and_4_processes_and_0_1_2_workers(shards):
    steps = 2 * N // G + 1  # two epochs and a bit: the remainder is completed across the boundary
    ref = reference(shards, steps)
    for e in range(2):
        assert sorted(ref[e * N:(e + 1) * N]) == list(range(N))  # each epoch: every sample once
    assert ref[:N] != ref[N:2 * N]  # a new order each epoch
    windows = [set(ref[w * BUFFER:(w + 1) * BUFFER]) for w in range(4)]  # a window draws from its own samples
    assert all(len(w) == BUFFER for w in windows)
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            layout = Layout(shards, world, workers)
            try:
                assert layout.steps(steps) == ref, (world, workers)
            finally:
                layout.close()


def test_a_plan_says_the_same_order_as_the_loader(shards):
    """The arithmetic alone (pipeline.data.plan), for many layouts at once: every stream's epoch, merged back into
    chunk order, is the one-stream order."""
    counts = [PER_SHARD] * (N // PER_SHARD) + [N % PER_SHARD]
    ref = [int(x) for g in Plan(counts, G, 1, 1, 0, BUFFER).epoch_groups(0, 0) for x in g.samples]
    assert sorted(ref) == list(range(N))
    for world, workers, micro in [(2, 1, 6), (3, 2, 4), (4, 4, 3), (12, 1, 1), (64, 4, 1)]:
        plan = Plan(counts, micro, world, workers, 0, BUFFER)
        got = {int(p) - 0: int(x) for s in range(plan.T) for g in plan.epoch_groups(s, 0)
               for p, x in zip(g.positions, g.samples)}
        assert [got[p] for p in range(N)] == ref, (world, workers, micro)


@pytest.mark.parametrize(("before", "after"), [((1, 0), (2, 0)), ((2, 1), (1, 0)), ((2, 0), (4, 2)),
                                               ((4, 1), (3, 0)), ((2, 2), (2, 0))])
def test_a_mid_epoch_resume_on_another_layout_delivers_each_sample_once(shards, before, after):
    steps = 2 * N // G + 2
    ref = reference(shards, steps)
    cut = 4  # steps before the checkpoint: position 48 of epoch 0
    first = Layout(shards, *before)
    got = first.steps(cut)
    state = first.state()
    first.close()
    second = Layout(shards, *after)
    for lo in second.loaders:
        lo.load_state_dict(state)
    got += second.steps(steps - cut)
    second.close()
    assert sorted(got[:N]) == list(range(N))  # the interrupted epoch: every sample once
    assert got == ref  # and exactly the uninterrupted order, this epoch and the next
    assert second.loaders[0].epoch == steps * G // N


def test_skips_before_the_checkpoint_are_not_lost_across_a_layout_change(shards, tmp_path):
    """A corrupt sample in the first job's part of the epoch (skipped: its stream takes its next position, so the
    streams' cursors stop being aligned): the resumed job on another layout delivers exactly the positions the
    first did not, so the epoch holds every intact sample once, and the skip count (summed over ranks) is kept."""
    ref = reference(shards, 2)
    bad = ref[3]  # a sample of the first global batch
    folder = copy_folder(shards, str(tmp_path / "bad"))
    path = f"{folder}/train-{bad // PER_SHARD:06d}.tar"
    _, header, _ = member_spans(path)[bad % PER_SHARD]  # u8, unlabelled: one member per sample
    data = read_bytes(path)
    data[header + 148:header + 156] = b"0000000\x00"  # a wrong header checksum: the read fails there
    write_bytes(path, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        first = Layout(folder, 2, 0, verify="off")
        got = first.steps(4)
        state = first.state()
        first.close()
        skipped = sum(lo.stats["skipped_samples"] for lo in first.loaders)
        second = Layout(folder, 3, 1, verify="off")
        for lo in second.loaders:
            lo.load_state_dict(state)
        got += second.steps(N // G)
        second.close()
    assert skipped >= 1 and sum(lo.stats["skipped_samples"] for lo in second.loaders) == skipped
    epoch0 = got[:N - skipped]
    assert len(set(epoch0)) == len(epoch0)  # nothing twice
    missing = set(range(N)) - set(epoch0)
    assert len(missing) == skipped and bad in missing  # every sample but the skipped ones
    assert all(m // PER_SHARD == bad // PER_SHARD and m >= bad for m in missing)  # lost: the failed read's rest


def test_a_record_of_one_rank_or_another_buffer_continues_at_the_next_epoch(shards):
    first = Layout(shards, 2, 0)
    first.steps(3)
    rank_record = first.loaders[0].state_dict()
    merged = first.state()
    first.close()
    other = StreamingLoader(DataConfig(shards=shards, num_workers=0, shuffle_buffer=BUFFER), batch_size=G)
    with pytest.warns(UserWarning, match=r"one rank's record: continuing at the start of epoch 1"):
        other.load_state_dict(rank_record)
    bigger = StreamingLoader(DataConfig(shards=shards, num_workers=0, shuffle_buffer=2 * BUFFER), batch_size=G // 2,
                             rank=0, world_size=2)
    with pytest.warns(UserWarning, match=r"shuffle_buffer.*continuing at the start of epoch 1"):
        bigger.load_state_dict(merged)
    it = iter(other)
    seq = [i for _ in range(-(-N // G)) for i in next(it)["index"].tolist()]
    it.close()
    assert sorted(seq[:N]) == list(range(N)) and other.epoch >= 1
    version1 = {**rank_record, "version": 1, "cursors": [[0, 36]]}  # a record written before the global order
    with pytest.warns(UserWarning, match=r"earlier version .* continuing at the start of epoch 1"):
        StreamingLoader(DataConfig(shards=shards, num_workers=0, shuffle_buffer=BUFFER), batch_size=G // 2,
                        rank=0, world_size=2).load_state_dict(version1)


def test_each_stream_reads_runs_that_tile_the_shards(shards):
    """Over all streams of a layout, an epoch's reads cover every sample once (so every byte once) and are runs of
    consecutive samples of one shard."""
    counts = [PER_SHARD] * (N // PER_SHARD) + [N % PER_SHARD]
    for world, workers, micro in [(1, 1, 12), (4, 2, 3), (64, 4, 1)]:
        plan = Plan(counts, micro, world, workers, 0, BUFFER)
        read = np.zeros(N, int)
        for s in range(plan.T):
            for g in plan.epoch_groups(s, 0):
                for i, base, lo, hi in g.runs:
                    assert 0 <= lo < hi <= counts[i]
                    read[base + lo:base + hi] += 1
        assert (read == 1).all(), (world, workers, micro)
