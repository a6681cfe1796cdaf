"""launch/train.py under a probe that records every host sync and every torch.distributed call, and where they came
from (tests/test_step_sync.py). Launched like launch/train.py (``accelerate launch tests/helpers/step_probe.py
--config ...``); each rank writes ``$STEP_PROBE_DIR/rank-<r>.json`` when training returns.

What is recorded:
- a host sync: ``aten::_local_scalar_dense`` (what ``.item()``, ``float(t)``, ``bool(t)`` run), seen by a
  TorchDispatchMode that stays on for the whole run;
- a collective: a call of a ``torch.distributed`` collective or point-to-point function (wrapped here, before
  anything else imports them), "async" when started with ``async_op=True``. DDP's gradient buckets are reduced by its C++ reducer, not through these.
Each is placed in the loop: "step" (between the loop hooks' step_begin and step_end: data, forward, backward,
optimizer step, EMA), "between" (after a step: log tick, sample grid, preemption, checkpoint, with the
sub-context "tick" / "grid" / "checkpoint" / "preemption" when inside those), "setup" or "end"; and attributed: "deepspeed"
when it comes from inside the DeepSpeed engine's forward, backward or step (its own collectives and overflow
check), "ddp" when from DDP's Python side (its communication hooks, e.g. train.grad_comm_dtype=bf16), else
"ours" (a DeepSpeed utility called by our code included), with the innermost repository frame.

``STEP_PROBE_INJECT_AT=K``: a negative control. Inside step K a ``.item()`` is added (in TickStats.add), and
after it a blocking flag all-reduce (``pipeline.dist.any_true``, what the preemption check once was) is added
before the preemption decision: the probe must report exactly these two.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "gather",
               "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced")
HERE = str(Path(__file__).resolve())
DEEPSPEED = f"{os.sep}deepspeed{os.sep}"
ENGINE, ENGINE_ENTRIES = os.path.join("deepspeed", "runtime", "engine.py"), ("forward", "backward", "step")
DDP = (os.path.join("ddp_comm_hooks", ""), os.path.join("nn", "parallel", "distributed.py"))


class Probe:
    def __init__(self) -> None:
        self.state, self.step, self.context = "setup", -1, []
        self.events: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}

    def record(self, kind: str, what: str) -> None:
        frames = []
        f = sys._getframe(1)
        while f is not None:
            name = f.f_code.co_filename
            frames.append((name, f.f_code.co_name))
            probe_itself = name == HERE and f.f_code.co_name in ("record", "wrapper", "__torch_dispatch__")
            if name.startswith(str(REPO)) and "site-packages" not in name and not probe_itself:
                break  # the innermost repository frame: the code that caused this
            f = f.f_back
        # DeepSpeed's own: reached through its engine's training entry points (forward, and backward and step,
        # which accelerator.backward calls), hooks included. A DeepSpeed utility our code calls (e.g. the
        # per-parameter safe_get_full_fp32_param gather the EMA once made) stays ours.
        engine = any(name.endswith(ENGINE) and fn in ENGINE_ENTRIES for name, fn in frames)
        orphan_hook = f is None and any(DEEPSPEED in name for name, _ in frames)  # a backward hook on a worker thread
        ddp = any(part in name for name, _ in frames for part in DDP)  # DDP's gradient buckets (a comm hook)
        owner = "deepspeed" if engine or orphan_hook else "ddp" if ddp else "ours"
        where = (f"{Path(f.f_code.co_filename).relative_to(REPO)}:{f.f_lineno} {f.f_code.co_name}" if f is not None
                 else "?")
        context = self.context[-1] if self.context else ""
        key = f"{owner}/{kind}/{self.state}{'/' + context if context else ''}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if owner == "ours":
            self.events.append({"kind": kind, "what": what, "state": self.state, "context": context,
                                "step": self.step, "where": where})


PROBE = Probe()


class SyncCounter(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            PROBE.record("sync", str(args[0].device))
        return func(*args, **(kwargs or {}))


def _wrap_collective(name: str) -> None:
    original = getattr(c10d, name, None) or getattr(tdist, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        PROBE.record("collective", name + (" async" if kwargs.get("async_op") else ""))
        return original(*args, **kwargs)

    for module in (tdist, c10d):
        if hasattr(module, name):
            setattr(module, name, wrapper)


def _in_context(cls: Any, method: str, context: str) -> None:
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        PROBE.context.append(context)
        try:
            return original(*args, **kwargs)
        finally:
            PROBE.context.pop()

    setattr(cls, method, wrapper)


def install(inject_at: int | None) -> Any:
    """Wrap the collectives and the loop's parts; returns the loop hooks that move the probe through the steps."""
    for name in COLLECTIVES:
        _wrap_collective(name)
    from pipeline.checkpoint import manager
    from pipeline.train import ema, loop, preemption, ticks
    from pipeline.train.hooks import LoopHooks

    class ProbeHooks(LoopHooks):
        """"step" from step_begin to step_end (data, forward, backward, optimizer step, EMA), then "between"."""

        def step_begin(self, step: int, first_step: int) -> None:
            PROBE.state, PROBE.step = "step", step

        def step_end(self, steps_done: int, first_step: int, ema: Any) -> None:
            PROBE.state, PROBE.step = "between", steps_done

        def close(self, ema: Any) -> None:
            PROBE.state = "end"

    _in_context(ticks.TickStats, "flush", "tick")
    _in_context(manager.CheckpointManager, "save", "checkpoint")
    for cls in (ema.EMA, ema.PartitionedEMA):
        _in_context(cls, "gathered_model", "grid")
    _in_context(loop, "log_sample_grid", "grid")  # a function: the name the loop calls, in its module
    _in_context(preemption.Preemption, "step_end", "preemption")

    if inject_at is not None:
        add, step_end = ticks.TickStats.add, preemption.Preemption.step_end

        def add_with_sync(self, loss_q, count_q, applied, grad_norm, data_wait_s):
            if PROBE.step == inject_at:
                applied.item()  # the injected host sync
            return add(self, loss_q, count_q, applied, grad_norm, data_wait_s)

        def step_end_with_collective(self, step, final):
            if step == inject_at + 1:
                from pipeline import dist

                dist.any_true(False)  # the injected collective (outside the "preemption" context)
            return step_end(self, step, final)

        ticks.TickStats.add, preemption.Preemption.step_end = add_with_sync, step_end_with_collective
    return ProbeHooks()


def main() -> int:
    out = Path(os.environ["STEP_PROBE_DIR"])
    inject = os.environ.get("STEP_PROBE_INJECT_AT")
    hooks = install(int(inject) if inject else None)
    from launch.train import main as train_main

    mode = SyncCounter()
    mode.__enter__()
    try:
        code = train_main(hooks=hooks)
    finally:
        mode.__exit__(None, None, None)
        rank = os.environ.get("RANK", "0")
        (out / f"rank-{rank}.json").write_text(json.dumps({"events": PROBE.events, "counts": PROBE.counts}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
