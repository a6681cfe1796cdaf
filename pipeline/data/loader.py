"""The streaming loader: WebDataset shards -> float batches in [-1, 1] (or uint8), exact epochs, resumable.

    loader = StreamingLoader(cfg.data, batch_size=micro_batch_per_gpu, rank=rank, world_size=world_size)
    for batch in loader:              # infinite; batch["image"] (B, C, H, W) float32, batch["label"] (B,) int64,
        ...                           # batch["index"] (B,) int64: the samples' positions in the split
    StreamingLoader(..., uint8=True, pin_memory=True)  # the trainer's: uint8 [0, 255], page-locked, scaled on the GPU
    loader.state_dict() / loader.load_state_dict(sd)

Each rank's stream is a flat list of stages, each a generator over the previous one: slots (which raw
samples, in which order, flipped or not; pipeline.data.plan assigns them in exact mode) -> decode
(pipeline.data.decode, skips per pipeline.data.report) -> batch (scaled into a buffer that
pipeline.data.transport moves to the training process).

* Order. Exact mode delivers one global order, whatever the layout (pipeline.data.plan): each epoch's shard
  sequence cut into windows of `shuffle_buffer` samples, each window permuted (and its flips drawn) by a
  generator of (seed, epoch, window); a stream reads its positions of each window as runs of consecutive
  samples. Decoding happens after the permutation, so skipping to a resume point costs tar reads only.
* Resume. Every batch carries its stream's cursor (how many of its positions it has passed). The loader
  records the cursor of each batch it hands to the consumer, so prefetched batches never count. On resume
  each stream restarts at its cursor and the round-robin order is rotated to continue at worker k mod K.
  `merge_states` makes one record of all ranks' cursors, which a loader of any other layout resumes at the
  same global position (the positions not yet delivered first).

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

STATE_VERSION = 2
LAYOUT_KEYS = ("mode", "seed", "num_samples", "batch_size", "world_size", "num_workers", "shuffle_buffer")


def _runs(positions: np.ndarray) -> list[list[int]]:
    """Sorted positions as [start, stop) runs (JSON-compact)."""
    if len(positions) == 0:
        return []
    cut = np.flatnonzero(np.diff(positions) != 1) + 1
    return [[int(r[0]), int(r[-1]) + 1] for r in np.split(positions, cut)]


def _positions(runs: list[list[int]]) -> np.ndarray:
    return (np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs]) if runs
            else np.zeros(0, np.int64))


@dataclass
class _Slot:
    raw: Raw
    flip: bool
    cursor: tuple[int, ...]  # stream position after this slot: exact (n,), its n-th position; resampled (round, slot)


class _Stream(IterableDataset):
    """One rank's dataset; each DataLoader worker (or the main process when num_workers=0) is a stream."""

    def __init__(self, shardset: ShardSet, cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 cursors: list[tuple[int, ...]], rotation: int, plan: Plan | None, ring: Ring | None = None,
                 uint8: bool = False, pin: bool = False):
        self.shardset, self.cfg, self.B, self.ring = shardset, cfg, batch_size, ring
        self.uint8, self.pin = uint8, pin
        self.rank, self.R = rank, world_size
        self.K = max(1, cfg.num_workers)
        self.cursors, self.rotation, self.plan = cursors, rotation, plan
        self.block = cfg.shuffle_buffer if cfg.shuffle_buffer > 1 else 0  # 0 = no sample shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.K
        if info is not None:
            torch.set_num_threads(1)  # decode is per-sample numpy/PIL work; avoid oversubscribing cores
        s = worker * self.R + self.rank
        report = Report(self.cfg.strict)
        cursor = self.cursors[worker]
        stages = [
            # 1. this stream's slots, from its cursor on: exact = its positions of the global order,
            #    resampled = rounds of shards drawn with replacement; unreadable samples are placeholders
            self._exact_slots(s, cursor[0], report) if self.cfg.mode == "exact"
            else self._resampled_slots(s, *cursor, report),
            # 2. decode to uint8 (H, W, C) and apply the slot's flip; bad samples counted and dropped
            lambda src: self._decode(src, report),
            # 3. batches of B as float32 (B, C, H, W) in [-1, 1], or as uint8; each carries the stream cursor
            lambda src: self._batch(src, worker, report),
        ]
        it = stages[0]
        for stage in stages[1:]:
            it = stage(it)
        return it

    # stage 1 (exact) ----------------------------------------------------------------------------
    def _exact_slots(self, s: int, n: int, report: Report) -> Iterator[_Slot]:
        """Stream s's positions from its n-th on: each group (the stream's positions in one window of the
        global order) read as runs of consecutive samples, then emitted in position order."""
        plan, shards = self.plan, self.shardset.shards
        assert plan is not None
        for g in plan.groups(s, n):
            raws: dict[int, Raw] = {}
            for i, base, lo, hi in self._reads(g.runs):
                for raw in read_piece(shards[i], base, lo, hi, report, self.shardset):
                    raws[raw.index] = raw  # a covering read's samples of other streams are not used
            samples, flips, hflip, n0 = g.samples.tolist(), g.flips.tolist(), self.cfg.hflip, g.n0
            for j in range(max(n - n0, 0), len(samples)):
                yield _Slot(raws[samples[j]], flips[j] and hflip, (n0 + j + 1,))

    def _reads(self, runs: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        """The group's runs; a shard that is read from its first byte anyway (a pipe: command, which cannot
        seek, or a shard without a sample index) is read once per group, covering its runs, not once per run."""
        out, cover = [], {}
        for i, base, lo, hi in runs:
            url = self.shardset.shards[i].url
            if url.startswith("pipe:") or url not in self.shardset.index:
                _, _, clo, chi = cover.get(i, (i, base, lo, hi))
                cover[i] = (i, base, min(clo, lo), max(chi, hi))
            else:
                out.append((i, base, lo, hi))
        return out + list(cover.values())

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
                dtype = torch.uint8 if self.uint8 else torch.float32
                buf, slot = batch_buffer(self.ring, worker, seq, batch_nbytes(self.B, c, h, w, dtype), in_worker,
                                         self.pin)
                views = batch_views(buf, self.B, (c, h, w), dtype)
                out, labels, indices = (v.numpy() for v in views)
                if not self.uint8 and (stage is None or stage.shape != out.shape):
                    stage = np.empty(out.shape, np.uint8)
                n = 0
            elif image.shape != (out.shape[2], out.shape[3], out.shape[1]):
                report.sample_failed(sl.raw, f"image shape {image.shape} differs from the batch's (H, W, C)")
                continue
            # HWC -> CHW into a uint8 batch (the batch itself when it travels as uint8), scaled into the batch's
            # buffer once it is full: one numpy pass per batch instead of two per sample (the per-call overhead
            # is most of their cost at 32x32)
            (out if self.uint8 else stage)[n] = image.transpose(2, 0, 1)
            labels[n], indices[n] = label, index
            n += 1
            if n == self.B:
                if not self.uint8:
                    to_unit_range(stage, out)
                meta = {"_worker": worker, "_cursor": sl.cursor,
                        "_skipped": (report.skipped_samples, report.skipped_shards)}
                yield {**pack(views, buf, slot, seq, in_worker), **meta}
                seq, buf = seq + 1, None


class StreamingLoader:
    """Per-rank loader; infinite iteration; state_dict() is the position of the next batch the consumer gets."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 uint8: bool = False, pin_memory: bool = False):
        """``uint8``: batch["image"] stays uint8 in [0, 255] (a quarter of the bytes; the consumer scales it with
        ``pipeline.data.decode.unit_range``, as the trainer does on its device). ``pin_memory``: batches arrive in
        page-locked memory (where CUDA is present), so their copy to the GPU does not hold the host."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0 (the per-rank micro batch)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.uint8, self.pin_memory = uint8, pin_memory
        self._dtype = torch.uint8 if uint8 else torch.float32
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
        self._counts = [sh.num_samples for sh in shards]
        self._set_sequence(np.zeros(0, np.int64), 0)
        self._batches = 0
        self._cursors: list[tuple[int, ...]] = [(0,) if exact else (0, 0)] * self.K
        self._skipped_base = (0, 0)
        self._skipped: dict[int, tuple[int, int]] = {}
        self._generation = 0

    def _set_sequence(self, holes: np.ndarray, base: int) -> None:
        """The positions this loader delivers: `holes`, then base, base + 1, ... (pipeline.data.plan)."""
        self._holes, self._base = holes, base
        self.plan = (Plan(self._counts, self.batch_size, self.world_size, self.K, self.cfg.seed,
                          self.cfg.shuffle_buffer, holes, base) if self.cfg.mode == "exact" else None)

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
        """Epoch of the next sample (exact mode): the position after the samples delivered on all ranks // N."""
        if self.num_samples <= 0 or self.plan is None:
            return 0
        return int(self.plan.position(self._batches * self.batch_size * self.world_size)) // self.num_samples

    def _layout(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "seed": self.cfg.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_workers": self.K,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON). `merge_states` makes one record of all ranks' that any layout resumes."""
        st = self.stats
        return {"version": STATE_VERSION, **self._layout(), "rank": self.rank, "batches": self._batches,
                "cursors": [list(c) for c in self._cursors], "holes": _runs(self._holes), "base": self._base,
                "skipped": [st["skipped_samples"], st["skipped_shards"]]}

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One record of the loader's global position from every rank's state_dict (in rank order): the
        cursor of every stream (s = worker * world_size + rank) and each rank's skip counts."""
        first = states[0]
        world, workers = first["world_size"], first["num_workers"]
        if len(states) != world or [st.get("rank") for st in states] != list(range(world)):
            raise ValueError(f"merge_states needs the {world} ranks' states in rank order")
        if len({st["batches"] for st in states}) != 1:
            raise ValueError(f"ranks delivered different batch counts: {[st['batches'] for st in states]}")
        layout = {k: first[k] for k in LAYOUT_KEYS}
        return {"version": STATE_VERSION, "scope": "global", **layout, "batches": first["batches"],
                "holes": first["holes"], "base": first["base"],
                "streams": [states[r]["cursors"][w] for w in range(workers) for r in range(world)],
                "skipped": [st["skipped"] for st in states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` (this rank's state_dict, or merge_states' global record) stopped.

        The same layout continues sample for sample. From a global record, another world size, micro batch
        or worker count continues the interrupted epoch with exactly the positions not yet delivered (exact
        mode); a per-rank record of another layout, another shuffle_buffer, or a record of an earlier
        version continues at the start of the next epoch (warned). Another seed, mode or data set is refused.
        """
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {version!r} is not {STATE_VERSION}")
        mine = self._layout()
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if {"mode", "seed", "num_samples"} & changed.keys():
            raise ValueError(
                f"loader state does not match this data/config: {changed} (saved, now); "
                "resume with the same data.shards, data.mode and data.seed"
            )
        is_global = state.get("scope") == "global"
        skipped = [tuple(x) for x in state["skipped"]] if is_global else [tuple(state["skipped"])]
        self._skipped = {}
        self._generation += 1
        if version == STATE_VERSION and not changed:
            self._skipped_base = skipped[self.rank] if is_global else skipped[0]
            self._batches = int(state["batches"])
            self._set_sequence(_positions(state["holes"]), int(state["base"]))
            streams = state["streams"] if is_global else None
            self._cursors = ([tuple(streams[w * self.world_size + self.rank]) for w in range(self.K)]
                             if is_global else [tuple(c) for c in state["cursors"]])
            return
        # another layout: one rank keeps the counts, so their sum over ranks is unchanged
        self._skipped_base = tuple(map(sum, zip(*skipped))) if self.rank == 0 else (0, 0)
        self._batches = 0
        if (version == STATE_VERSION and is_global and self.cfg.mode == "exact"
                and "shuffle_buffer" not in changed):
            old = Plan(self._counts, state["batch_size"], state["world_size"], state["num_workers"], self.cfg.seed,
                       self.cfg.shuffle_buffer, _positions(state["holes"]), int(state["base"]))
            holes, base = old.remaining([c[0] for c in state["streams"]])
            self._set_sequence(holes, base)
            self._cursors = [(0,)] * self.K
            return
        # the positions of the interrupted epoch cannot be told: exactly once again from the next epoch boundary
        delivered = int(state["batches"]) * state["batch_size"] * state["world_size"]
        if version == 1:
            nxt = delivered // max(self.num_samples, 1) + 1
            why = "written by an earlier version (another sample order)"
        else:
            at = Plan(self._counts, 1, 1, 1, 0, 0, _positions(state["holes"]), int(state["base"])).position(delivered)
            nxt = int(at) // max(self.num_samples, 1) + 1
            why = f"layout changed {changed} (saved, now)" + ("" if is_global else ", and it is one rank's record")
        warnings.warn(f"loader state {why}: continuing at the start of epoch {nxt}", stacklevel=2)
        if self.cfg.mode == "exact":
            self._set_sequence(np.zeros(0, np.int64), nxt * self.num_samples)
            self._cursors = [(0,)] * self.K
        else:
            self._cursors = [(nxt, 0)] * self.K

    # -- iteration -----------------------------------------------------------------------------
    def _ring(self) -> Ring | None:
        """Shared batch slots for the workers, when the manifest gives the batch geometry up front."""
        size, channels = self.shardset.image_size, self.shardset.channels
        if self.cfg.num_workers == 0 or not size or not channels:
            return None
        return create_ring(self.K, self.cfg.prefetch_factor,
                           batch_nbytes(self.batch_size, channels, size, size, self._dtype))

    def _dataset(self, ring: Ring | None = None) -> _Stream:
        return _Stream(self.shardset, self.cfg, self.batch_size, self.rank, self.world_size,
                       list(self._cursors), rotation=self._batches % self.K, plan=self.plan, ring=ring,
                       uint8=self.uint8, pin=self.pin_memory)

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
                    unpack(batch, worker, ring, self.batch_size, self._dtype, self.pin_memory)
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
