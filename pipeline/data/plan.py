"""Exact-epoch arithmetic: one global sample order per (seed, epoch), and which of its positions each stream reads.

The order (docs/data.md, "Exact mode: the policy"; the same for every layout):

* Epoch e is a permutation of the split's N samples, built from the data alone: the shards in a
  (seed, e)-shuffled order, concatenated, cut into windows of `window` (data.shuffle_buffer) samples, and
  each window permuted by a generator of (seed, e, window); each position also draws its flip there.
  The global stream is epoch 0, epoch 1, ... back to back: position p is sample order(p // N)[p % N].
  Nothing in it depends on the number of ranks, workers or the micro batch.
* Layout. Each rank runs K = max(1, num_workers) worker streams; stream s = worker * world_size + rank of
  T = world_size * K. The sequence of positions (normally 0, 1, 2, ...; after a resume on another layout,
  the positions the old layout had not delivered first: `holes`, then `base`, base + 1, ...) is cut into
  micro-batches of B: chunk c belongs to stream c mod T, so rank r's k-th micro-batch is chunk k * W + r and
  an optimizer step of A accumulation steps covers positions [j * G, (j + 1) * G) with G = A * W * B,
  whatever W, B and K are. Every batch is full; an epoch's remainder is completed by the next epoch's first
  samples (as in EDM's InfiniteSampler).
* Reading. A stream reads, window by window, the samples of its positions in that window, each sample's bytes
  once: the samples sorted by their place in the shards and read as runs of consecutive samples
  (`Group.runs`). Over all streams, the runs of an epoch tile the shards: each byte is read once.

Every random choice comes from `seeded(...)`, a generator of the seed and a position, so a resumed stream
draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def seeded(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]))


GROUP = 1024  # positions read together when the order is not shuffled (data.shuffle_buffer 0 or 1)


@dataclass
class Group:
    """A stream's positions inside one window of the global order, and the reads that fetch their samples."""

    epoch: int
    n0: int  # the stream's owned index of the group's first position
    positions: np.ndarray  # global positions, increasing
    samples: np.ndarray  # each position's sample: its index in the split (manifest order)
    flips: np.ndarray  # bool, each position's flip
    runs: list[tuple[int, int, int, int]]  # (shard, split index of its sample 0, lo, hi): consecutive samples


class Plan:
    def __init__(self, counts: Sequence[int], batch_size: int, world_size: int, workers: int, seed: int,
                 window: int, holes: np.ndarray | None = None, base: int = 0):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.B, self.R, self.K, self.seed = batch_size, world_size, workers, seed
        self.T = world_size * workers
        self.N = int(self.counts.sum())
        self.shuffle = window > 1
        self.window = window if self.shuffle else GROUP
        self.holes = np.asarray(holes if holes is not None else [], dtype=np.int64)
        self.base = int(base)
        self.bases = np.concatenate([[0], np.cumsum(self.counts)])
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- the global order ---------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        return seeded(self.seed, epoch, 0x5A4D).permutation(len(self.counts))

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards in epoch order, cumulative sample counts in that order)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            order = self.shard_order(epoch)
            self._orders[epoch] = (order, np.cumsum(self.counts[order]))
        return self._orders[epoch]

    def window_draws(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, flips) of window w of epoch `epoch`: offset o of the window holds the window's
        sample perm[o] of the epoch's shard sequence."""
        n = min(self.window, self.N - w * self.window)
        rng = seeded(self.seed, epoch, w, 0xB10C)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        return perm, rng.random(n) < 0.5

    def sample_at(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """The split indices of the samples at `offsets` (positions within the epoch, one window's)."""
        w = int(offsets[0]) // self.window
        perm, _ = self.window_draws(epoch, w)
        seq = w * self.window + perm[offsets - w * self.window]
        order, cum = self._order(epoch)
        j = np.searchsorted(cum, seq, side="right")
        shard = order[j]
        return self.bases[shard] + seq - (cum[j] - self.counts[shard])

    # -- positions of a layout ----------------------------------------------------------------------
    def position(self, q: np.ndarray | int) -> np.ndarray:
        """Global position of index q of this plan's sequence (the holes, then base, base + 1, ...)."""
        q = np.asarray(q, dtype=np.int64)
        h = len(self.holes)
        return np.where(q < h, self.holes[np.minimum(q, max(h - 1, 0))] if h else 0, self.base + q - h)

    def owned(self, s: int, n: np.ndarray | int) -> np.ndarray:
        """Sequence index of stream s's n-th position: chunks s, s + T, s + 2T, ... of B each."""
        n = np.asarray(n, dtype=np.int64)
        return (s + (n // self.B) * self.T) * self.B + n % self.B

    def owner(self, q: np.ndarray) -> np.ndarray:
        return (q // self.B) % self.T

    def owned_before(self, s: int, q: np.ndarray) -> np.ndarray:
        """How many of stream s's positions lie before sequence index q."""
        chunks, rest = np.divmod(q, self.B * self.T)
        return chunks * self.B + np.clip(rest - s * self.B, 0, self.B)

    # -- a stream's reads ---------------------------------------------------------------------------
    def groups(self, s: int, n: int) -> Iterator[Group]:
        """Stream s's groups, from the one that holds its n-th position (whole: a resumed stream re-reads it,
        so the reads, and what they count, do not depend on where it resumed)."""
        while True:
            p = int(self.position(self.owned(s, n)))
            epoch, off = divmod(p, self.N)
            lo_p = epoch * self.N + off // self.window * self.window
            hi_p = min(lo_p + self.window, (epoch + 1) * self.N)
            # positions increase by at least 1 per owned index: the window's are within this range
            span = np.arange(max(0, n - (p - lo_p)), n + (hi_p - p), dtype=np.int64)
            pos = self.position(self.owned(s, span))
            first, last = np.searchsorted(pos, [lo_p, hi_p])
            n0, pos = int(span[first]), pos[first:last]
            offsets = pos - epoch * self.N
            samples = self.sample_at(epoch, offsets)
            _, flips = self.window_draws(epoch, int(offsets[0]) // self.window)
            yield Group(epoch, n0, pos, samples, flips[offsets % self.window], self._runs(samples))
            n = n0 + len(pos)

    def _runs(self, samples: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Reads of consecutive samples covering `samples`, in the order of the shards on disk."""
        idx = np.unique(samples)
        shard = np.searchsorted(self.bases, idx, side="right") - 1
        k = idx - self.bases[shard]
        cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(shard) != 0)) + 1
        out = []
        for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(idx)]])):
            i = int(shard[a])
            out.append((i, int(self.bases[i]), int(k[a]), int(k[b - 1]) + 1))
        return out

    def epoch_groups(self, s: int, epoch: int) -> Iterator[Group]:
        """Stream s's groups of epoch `epoch` (for inspection and tests)."""
        h, first = len(self.holes), epoch * self.N
        i = int(np.searchsorted(self.holes, first))
        q0 = i if i < h else h + max(first - self.base, 0)
        for g in self.groups(s, int(self.owned_before(s, np.int64(q0)))):
            if g.epoch > epoch:
                return
            yield g

    # -- another layout ----------------------------------------------------------------------------
    def remaining(self, cursors: Sequence[int]) -> tuple[np.ndarray, int]:
        """(holes, base) of the positions a stream set at `cursors` (stream s at its cursors[s]-th position) has
        not delivered: the sequence a plan of another layout continues with, so each position comes once."""
        nxt = np.array([int(self.owned(s, n)) for s, n in enumerate(cursors)], dtype=np.int64)
        lo, hi = int(nxt.min()), int(nxt.max())
        q = np.arange(lo, hi, dtype=np.int64)
        owner = self.owner(q)
        delivered = q < nxt[owner]
        last = int(q[delivered][-1]) + 1 if delivered.any() else lo
        end = max(last, len(self.holes))  # the old holes not reached yet stay holes
        q = np.arange(lo, end, dtype=np.int64)
        keep = ~(q < nxt[self.owner(q)])
        return self.position(q[keep]), self.base + end - len(self.holes)
