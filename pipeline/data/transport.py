"""Moving a batch from a DataLoader worker to the training process: one uint8 buffer, usually a ring slot.

A batch is one uint8 buffer [labels | indices | image]. When the manifest gives the image geometry and a
batch is at most 16 MiB, each worker writes into a ring of `prefetch_factor + 2` preallocated
shared-memory slots, only the slot number crosses the DataLoader's queue, and the training process
copies the batch out (one memcpy) and frees the slot. The DataLoader asks a worker for batch j only after
the training process took batch j - prefetch_factor, so a slot is always free when it is reused; a shared
counter of copied batches guards this anyway (the worker waits on it). Otherwise (geometry unknown,
bigger batches) each batch is one fresh shared-memory buffer, sent as one file descriptor.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Ring:
    """Preallocated shared-memory batch slots, (workers, slots, bytes), and per worker the count of its
    batches the main process has copied out (written by the main process, read by the worker)."""

    buf: torch.Tensor
    done: torch.Tensor

    @staticmethod
    def create(workers: int, slots: int, nbytes: int) -> Ring:
        return Ring(torch.empty((workers, slots, nbytes), dtype=torch.uint8).share_memory_(),
                    torch.zeros(workers, dtype=torch.int64).share_memory_())


# the ring holds workers x (prefetch_factor + 2) batches of /dev/shm for the loader's lifetime; larger
# batches (big images) are decode-bound, where a fresh buffer per batch costs little
_RING_MAX_BATCH_BYTES = 16 << 20


def _ring_slots(prefetch_factor: int) -> int:
    return prefetch_factor + 2


def batch_nbytes(batch_size: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one batch's buffer [labels | indices | image]."""
    n = 16 * batch_size + dtype.itemsize * batch_size * c * h * w
    return -(-n // 64) * 64  # rows of a ring start 64-byte aligned


def batch_views(buf: torch.Tensor, batch_size: int, chw: tuple[int, int, int],
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(image ``dtype`` (B, C, H, W), label int64 (B,), index int64 (B,)) sharing one uint8 buffer."""
    b8 = 8 * batch_size
    image = buf[2 * b8:2 * b8 + dtype.itemsize * batch_size * math.prod(chw)].view(dtype).view(batch_size, *chw)
    return image, buf[:b8].view(torch.int64), buf[b8:2 * b8].view(torch.int64)


def create_ring(workers: int, prefetch_factor: int, nbytes: int) -> Ring | None:
    """Shared slots for the batches of `workers` workers; None where batches are too big for a ring."""
    if nbytes > _RING_MAX_BATCH_BYTES:
        return None
    return Ring.create(workers, _ring_slots(prefetch_factor), nbytes)


def batch_buffer(ring: Ring | None, worker: int, seq: int, nbytes: int, in_worker: bool,
                 pin: bool = False) -> tuple[torch.Tensor, int]:
    """Where batch `seq` of this worker is written: (uint8 buffer, ring slot or -1); ``pin``: in page-locked
    memory, when written in the training process itself (a worker never touches CUDA)."""
    if in_worker and ring is not None and ring.buf.shape[2] >= nbytes:
        slots = ring.buf.shape[1]
        # Slot seq % slots last held batch seq - slots. The DataLoader asks a worker for batch j only
        # after the main process took batch j - prefetch_factor, and slots = prefetch_factor + 2, so
        # it has been copied out already; this wait is a guard, not a path taken.
        parent = os.getppid()
        while int(ring.done[worker]) < seq - slots + 1:
            if os.getppid() != parent:
                raise RuntimeError("the training process exited; stopping this loader worker")
            time.sleep(0.0002)
        return ring.buf[worker, seq % slots, :nbytes], seq % slots
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin and not in_worker)
    if in_worker:
        buf.share_memory_()  # filled in place: the DataLoader then sends it without a copy
    return buf, -1


def pack(views: tuple[torch.Tensor, ...], buf: torch.Tensor, slot: int, seq: int, in_worker: bool) -> dict[str, Any]:
    """What a filled batch sends: its tensors (in the training process), a ring slot, or its buffer."""
    chw = tuple(views[0].shape[1:])
    if not in_worker:
        return {"image": views[0], "label": views[1], "index": views[2]}
    if slot >= 0:  # only the slot number crosses the process boundary
        return {"_slot": slot, "_seq": seq, "_shape": chw}
    return {"_buf": buf, "_shape": chw}  # one shared-memory tensor per batch: one file descriptor, not three


def unpack(batch: dict[str, Any], worker: int, ring: Ring | None, batch_size: int,
           dtype: torch.dtype = torch.float32, pin: bool = False) -> None:
    """A worker's batch -> image/label/index tensors (in place); frees its ring slot. ``pin``: the tensors end in
    page-locked memory (one copy out of the ring slot, as without), so a non_blocking copy to a GPU is a real
    asynchronous DMA; torch's caching host allocator keeps a block until the copies reading it are done."""
    if "_slot" in batch:
        assert ring is not None
        chw = batch.pop("_shape")
        src = ring.buf[worker, batch.pop("_slot"), :batch_nbytes(batch_size, *chw, dtype)]
        buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)  # the consumer may keep the batch;
        buf.copy_(src)  # the slot is reused
        ring.done[worker] = batch.pop("_seq") + 1
    elif "_buf" in batch:
        buf, chw = batch.pop("_buf"), batch.pop("_shape")
        if pin:
            buf = buf.pin_memory()
    else:
        return
    batch["image"], batch["label"], batch["index"] = batch_views(buf, batch_size, chw, dtype)
