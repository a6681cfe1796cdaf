"""The streaming loader: WebDataset shards -> float batches in [-1, 1], exact epochs, resumable.

    loader = StreamingLoader(cfg.data, batch_size=micro_batch_per_gpu, rank=rank, world_size=world_size)
    for batch in loader:              # infinite; batch["image"] (B, C, H, W) float32, batch["label"] (B,) int64,
        ...                           # batch["index"] (B,) int64: the samples' positions in the split
    loader.state_dict() / loader.load_state_dict(sd)

Each rank's stream is a flat list of stages, each a generator over the previous one: slots (which raw
samples, in which order, flipped or not; pipeline.data.plan assigns them in exact mode) -> decode
(pipeline.data.decode, skips per pipeline.data.report) -> batch (scaled into a buffer that
pipeline.data.transport moves to the training process).

* Shuffle. A stream's slice is cut into blocks of `shuffle_buffer` samples; each block is permuted, and
  its flips drawn, by a generator seeded with (seed, epoch, stream, block). Decoding happens after the
  permutation, so skipping to a resume point costs tar reads only.
* Resume. Every batch carries its stream's cursor (epoch, slot within the slice). The loader records
  the cursor of each batch it hands to the consumer, so prefetched batches never count. On resume each
  stream restarts at its cursor and the round-robin order is rotated to continue at worker k mod K.

* Verification. A read that reaches a shard's end checks its sha256 against the manifest and holds its
  samples back until then (data.verify; pipeline.data.samples.read_piece, docs/data.md).

Resampled mode draws shards with replacement per stream (generator seeded with (seed, stream, round)),
reading shards until a round holds >= shuffle_buffer samples; it needs no per-shard counts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.decode import to_unit_range
from pipeline.data.plan import Plan, seeded
from pipeline.data.report import CorruptDataError, DataError, Report
from pipeline.data.samples import Raw, decode_sample, read_all, read_piece
from pipeline.data.shards import ShardSet, attach_index, check_shards, resolve_shards, start_verification
from pipeline.data.transport import Ring, batch_buffer, batch_nbytes, batch_views, create_ring, pack, unpack

STATE_VERSION = 1


@dataclass
class _Slot:
    raw: Raw
    flip: bool
    cursor: tuple[int, int]  # stream position after this slot: (epoch or round, slot index)


class _Stream(IterableDataset):
    """One rank's dataset; each DataLoader worker (or the main process when num_workers=0) is a stream."""

    def __init__(self, shardset: ShardSet, cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 cursors: list[tuple[int, int]], rotation: int, ring: Ring | None = None):
        self.shardset, self.cfg, self.B, self.ring = shardset, cfg, batch_size, ring
        self.rank, self.R = rank, world_size
        self.K = max(1, cfg.num_workers)
        self.cursors, self.rotation = cursors, rotation
        counts = [s.num_samples for s in shardset.shards]
        self.plan = Plan(counts, batch_size, world_size, self.K, cfg.seed) if shardset.counts_known else None
        self.block = cfg.shuffle_buffer if cfg.shuffle_buffer > 1 else 0  # 0 = no sample shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.K
        if info is not None:
            torch.set_num_threads(1)  # decode is per-sample numpy/PIL work; avoid oversubscribing cores
        s = worker * self.R + self.rank
        report = Report(self.cfg.strict)
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
    def _exact_slots(self, s: int, epoch: int, slot: int, report: Report) -> Iterator[_Slot]:
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
                    for raw in read_piece(shards[i], base, lo, hi, report, self.shardset)
                )
                for b in range(first_block, math.ceil(length / block)):
                    n = min(block, length - b * block)
                    raws = [next(reader) for _ in range(n)]
                    rng = seeded(self.cfg.seed, epoch, s, b, 0xB10C)
                    perm = rng.permutation(n) if self.block else np.arange(n)
                    flips = rng.random(n) < 0.5
                    for j in range(slot - b * block if b == first_block else 0, n):
                        yield _Slot(raws[perm[j]], bool(flips[j]) and self.cfg.hflip, (epoch, b * block + j + 1))
            epoch, slot = epoch + 1, 0

    # stage 1 (resampled) ------------------------------------------------------------------------
    def _resampled_slots(self, s: int, rnd: int, slot: int, report: Report) -> Iterator[_Slot]:
        shards = self.shardset.shards
        known = self.shardset.counts_known
        bases = np.concatenate([[0], np.cumsum([sh.num_samples for sh in shards])]) if known else None
        while True:
            rng = seeded(self.cfg.seed, s, rnd, 0x2E5A)
            raws: list[Raw] = []
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
                got = (read_piece(shards[i], base, 0, shards[i].num_samples, report, self.shardset)
                       if known else read_all(shards[i], report))
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
    def _decode(self, slots: Iterator[_Slot], report: Report) -> Iterator[tuple[np.ndarray, int, int, _Slot]]:
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
            got = decode_sample(raw, self.shardset, report)
            if got is None:
                bad_in_row += raw.lost  # a failure marker (lost=False) stands for no sample
                yield None, 0, 0, sl  # keeps the cursor moving
                continue
            bad_in_row = 0
            image, label = got
            if sl.flip:
                image = image[:, ::-1]
            yield image, label, raw.index, sl

    # stage 3 ------------------------------------------------------------------------------------
    def _batch(self, items, worker: int, report: Report) -> Iterator[dict[str, Any]]:
        in_worker = get_worker_info() is not None
        seq, buf, stage = 0, None, None
        for image, label, index, sl in items:
            if image is None:
                continue
            if buf is None:
                h, w, c = image.shape
                buf, slot = batch_buffer(self.ring, worker, seq, batch_nbytes(self.B, c, h, w), in_worker)
                views = batch_views(buf, self.B, (c, h, w))
                out, labels, indices = (v.numpy() for v in views)
                if stage is None or stage.shape != out.shape:
                    stage = np.empty(out.shape, np.uint8)
                n = 0
            elif image.shape != (stage.shape[2], stage.shape[3], stage.shape[1]):
                report.sample_failed(sl.raw, f"image shape {image.shape} differs from the batch's (H, W, C)")
                continue
            # HWC -> CHW into a uint8 batch, scaled into the batch's buffer once it is full: one numpy pass
            # per batch instead of two per sample (the per-call overhead is most of their cost at 32x32)
            stage[n] = image.transpose(2, 0, 1)
            labels[n], indices[n] = label, index
            n += 1
            if n == self.B:
                to_unit_range(stage, out)
                meta = {"_worker": worker, "_cursor": sl.cursor,
                        "_skipped": (report.skipped_samples, report.skipped_shards)}
                yield {**pack(views, buf, slot, seq, in_worker), **meta}
                seq, buf = seq + 1, None


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
        self.shardset = resolve_shards(cfg.shards, cfg.split, need_counts=exact, manifest=cfg.manifest)
        shards = self.shardset.shards
        if not shards:
            raise DataError(f"data.shards={cfg.shards!r} split {cfg.split!r} has no shards; re-run prepare")
        check_shards(shards, cfg.shards)
        if exact and not self.shardset.counts_known:
            raise DataError(
                f"data.mode=exact needs per-shard sample counts, but {cfg.shards!r} has no manifest.json beside "
                "its shards; point data.shards at the prepared folder, copy manifest.json next to the shards, "
                "name it with data.manifest=URL (pipe: lists), or use data.mode=resampled"
            )
        self.num_samples = self.shardset.num_samples if self.shardset.counts_known else -1
        if exact and self.num_samples == 0:
            raise DataError(f"data.shards={cfg.shards!r} split {cfg.split!r} holds 0 samples; re-run prepare")
        start_verification(self.shardset, cfg.verify, cfg.strict)
        unindexed = attach_index(self.shardset)  # each sample's byte range: a stream reads only its piece
        if exact and self.shardset.manifest is not None and unindexed:
            warnings.warn(
                f"data.shards={cfg.shards!r}: {len(unindexed)} of {len(shards)} shards (e.g. {unindexed[0].url}) "
                "have no sample index (prepared before it existed), so a stream reads each of them from its "
                "first byte to its piece; re-run prepare to read each byte once",
                UserWarning, stacklevel=2,
            )
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
    def _ring(self) -> Ring | None:
        """Shared batch slots for the workers, when the manifest gives the batch geometry up front."""
        size, channels = self.shardset.image_size, self.shardset.channels
        if self.cfg.num_workers == 0 or not size or not channels:
            return None
        return create_ring(self.K, self.cfg.prefetch_factor, batch_nbytes(self.batch_size, channels, size, size))

    def _dataset(self, ring: Ring | None = None) -> _Stream:
        return _Stream(self.shardset, self.cfg, self.batch_size, self.rank, self.world_size,
                       list(self._cursors), rotation=self._batches % self.K, ring=ring)

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
                    unpack(batch, worker, ring, self.batch_size)
                    self._cursors[worker] = tuple(batch.pop("_cursor"))
                    self._skipped[worker] = tuple(batch.pop("_skipped"))
                    self._batches += 1
                    yield batch
                    if self._generation != generation:
                        break  # load_state_dict was called: restart the workers at the new position
            except DataError as exc:
                lines = str(exc).strip().splitlines()
                if len(lines) < 2:
                    raise
                # the DataLoader re-raises a worker's error with the worker's traceback as its message; its
                # last line is "pipeline.data.report.CorruptDataError: <the message>"
                raise type(exc)(lines[-1].split(": ", 1)[-1]) from exc
            finally:
                del source
