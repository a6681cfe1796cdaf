"""Exact-epoch arithmetic: which positions of the endless global order each stream reads, from the counts.

How samples are assigned (the part that makes epochs exact with any shard count; docs/data.md):

* Streams. Each rank runs K = max(1, num_workers) worker streams; stream s = worker * world_size + rank
  of T = world_size * K. The DataLoader takes batches from its workers round-robin, so rank r's batch k
  comes from worker k mod K, and the global batch sequence is g = k * world_size + r.
* One endless global order. Epoch e is a permutation of the split's N samples; the global stream is
  epoch 0, epoch 1, ... back to back, cut into chunks of B: chunk g holds positions [g*B, (g+1)*B) and
  belongs to stream g mod T. So every batch is full, every rank yields batches forever at the same
  rate, and positions [e*N, (e+1)*N) hold every sample exactly once. A remainder (N not a multiple of
  B * world_size) is not dropped or padded: the epoch's last batch is completed by the next epoch's first
  samples (like EDM's InfiniteSampler).
* Slices, not shards. Stream s owns exactly the positions p with (p // B) mod T == s; it reads them as
  one contiguous slice of epoch e's shard sequence (shards in a (seed, epoch)-shuffled order,
  concatenated), at offsets computed from the manifest's per-shard counts. Any shard count works.

Every random choice of the loader comes from `seeded(...)`, a generator of its seed and position, so
the order is a function of (seed, epoch, layout) and a resumed stream draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def seeded(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]))


class Plan:
    def __init__(self, counts: list[int], batch_size: int, world_size: int, workers: int, seed: int):
        self.counts, self.B, self.R, self.K, self.seed = counts, batch_size, world_size, workers, seed
        self.T = world_size * workers
        self.N = sum(counts)

    def _before(self, x: int, s: int) -> int:
        """Positions p < x owned by stream s: (p // B) mod T == s."""
        cycle = self.T * self.B
        return (x // cycle) * self.B + min(max(x % cycle - s * self.B, 0), self.B)

    def slice(self, epoch: int, s: int) -> tuple[int, int]:
        """(start, length) of stream s's slice of epoch `epoch`'s concatenated shard sequence."""
        lo, hi = epoch * self.N, (epoch + 1) * self.N
        start = sum(self._before(hi, t) - self._before(lo, t) for t in range(s))
        return start, self._before(hi, s) - self._before(lo, s)

    def shard_order(self, epoch: int) -> np.ndarray:
        return seeded(self.seed, epoch, 0x5A4D).permutation(len(self.counts))

    def pieces(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, base index in the split, lo, hi) covering offsets [start, stop) of the epoch sequence."""
        bases = np.concatenate([[0], np.cumsum(self.counts)])
        offset = 0
        for i in self.shard_order(epoch):
            n = self.counts[i]
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                yield int(i), int(bases[i]), lo, hi
            offset += n
            if offset >= stop:
                break
