"""The one small distributed helper. Every function also works without a process group (one process).

The trainer talks to torch.distributed only through these, so the single-process path (``python
launch/train.py``, unit tests) needs no special cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_flag_group: Any = None  # a gloo group for host-side flags (set up once by init_flag_group)
_async_group: Any = None  # a gloo group of its own for start_any_true (its collectives never interleave with others)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier(group=_flag_group)


def shutdown() -> None:
    """Tear this rank's process groups down while the interpreter is whole (on success; no barrier, so a rank
    that is done need not wait for rank 0's work). Left to interpreter exit, a rank that finished first once
    aborted in gloo's teardown (SIGABRT, "terminate called without an active exception")."""
    global _flag_group, _async_group
    if not is_initialized():
        return
    dist.destroy_process_group()
    _flag_group = _async_group = None


def init_flag_group(timeout: Any = None) -> None:
    """Create a gloo group for host-side agreement (preemption flag, error flag).

    With NCCL, an all-reduce of a flag needs a device tensor and reading the result back is a
    device->host sync that waits for all queued kernels; over a gloo group the host threads agree
    with each other while the GPU keeps running. Must be called on every rank, once. Also creates the group
    ``start_any_true`` uses, always a separate one: an exchange left in flight across a step must not share a
    queue with the collectives of that step (the default group's under gloo, the flag group's).
    """
    global _flag_group, _async_group
    if not is_initialized() or _async_group is not None:  # (under gloo the flag group is the default one: None)
        return
    _flag_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _async_group = dist.new_group(backend="gloo", timeout=timeout)


def timeout_s() -> float | None:
    """The default process group's timeout in seconds (None without a process group)."""
    if not is_initialized():
        return None
    group = dist.distributed_c10d._get_default_group()
    for device in ("cuda", "cpu"):  # the backend of the default group: NCCL on GPUs, gloo on CPUs
        try:
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (RuntimeError, AttributeError, ValueError):
            continue
    return None


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a host-side all-reduce over gloo)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group)
    return bool(t.item())


def start_any_true(flag: bool) -> Callable[[], bool]:
    """Start ``any_true(flag)`` without waiting for it; the returned function waits for it and gives the result.

    Every rank must start the same sequence of exchanges. A CPU tensor over gloo: the host threads agree while the
    host goes on (no device sync on any backend); read one step later, the other ranks have long posted theirs, so
    the wait is about their skew at that point, which the next gradient all-reduce waits for anyway.
    """
    if not is_initialized():
        return lambda: bool(flag)
    if _async_group is None:
        raise RuntimeError("pipeline.dist.init_flag_group() must run on every rank before start_any_true()")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_async_group, async_op=True)

    def result() -> bool:
        work.wait()
        return bool(t.item())

    return result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (a picklable Python object, e.g. a path or a run id)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_flag_group)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst``, None on the others (each object is sent once,
    to ``dst`` only: what only one rank needs is not copied to every rank)."""
    if not is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_flag_group)
    return out
