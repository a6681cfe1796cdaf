"""No host sync and no collective of ours inside a training step, and none between steps except at log ticks,
sample grids, checkpoints and the preemption flags' non-blocking exchange (a CPU tensor over gloo): 2 gloo
processes under DDP and DeepSpeed ZeRO-2, traced by tests/helpers/step_probe.py (a TorchDispatchMode counting
aten::_local_scalar_dense, counters around the torch.distributed functions). DDP's gradient buckets (its C++ reducer) and DeepSpeed's own collectives and
overflow check are not ours and are set aside by the stack they come from.

Each run also carries a negative control: the probe adds one ``.item()`` inside step 3 and one flag all-reduce
after it (what the per-step EMA mask read and a blocking preemption check would be); the test requires that these,
and only these, are reported, so it would fail on a sync or collective added anywhere in the loop.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import trainer as h

pytestmark = pytest.mark.slow

STEPS, INJECT_AT, LOG_EVERY = 6, 3, 2


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


@pytest.mark.parametrize("stage", [0, 2], ids=["ddp", "zero2"])
def test_a_step_makes_no_host_sync_and_no_collective_of_ours(digits, tmp_path, stage):
    over = [f"data.shards={digits}", f"train.out_dir={tmp_path}/run", f"train.total_steps={STEPS}",
            f"logging.every_steps={LOG_EVERY}", "checkpoint.every_steps=1000", "train.micro_batch_per_gpu=4",
            "preemption.check_every_steps=1"]
    cmd = h.train_cmd(over, nproc=2, deepspeed_stage=stage, script=h.REPO / "tests" / "helpers" / "step_probe.py")
    probe = {"STEP_PROBE_DIR": str(tmp_path), "STEP_PROBE_INJECT_AT": str(INJECT_AT)}
    environ = h.launch_env(deepspeed=True, **probe) if stage else h.launch_env(multi=True, **probe)
    r = h.run(cmd, environ, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        events, counts = report["events"], report["counts"]
        in_loop = [e for e in events if e["state"] == "step"
                   or (e["state"] == "between" and e["context"] not in ("tick", "grid", "checkpoint", "preemption"))]
        found = sorted((e["kind"], e["state"], e["step"], e["where"].split(":")[0]) for e in in_loop)
        assert found == [("collective", "between", INJECT_AT + 1, "pipeline/dist.py"),  # the injected flag
                         ("sync", "between", INJECT_AT + 1, "pipeline/dist.py"),  # all-reduce, and its read
                         ("sync", "step", INJECT_AT, "tests/helpers/step_probe.py")], json.dumps(in_loop, indent=1)
        # The probe sees what it should: the tick's all-reduce and reads, once per tick.
        ticks = [e for e in events if e["context"] == "tick"]
        assert {e["step"] for e in ticks if e["kind"] == "collective"} == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert sum(e["kind"] == "collective" for e in ticks) == STEPS // LOG_EVERY  # one all-reduce per tick
        assert any(e["kind"] == "sync" for e in ticks)
        # The preemption flags: after each step but the last one exchange started without waiting (async, over
        # gloo on the host), read after the next step: a read of a CPU tensor, never of a device's.
        flags = [e for e in events if e["context"] == "preemption"]
        assert sorted((e["kind"], e["step"], e["what"]) for e in flags) == sorted(
            [("collective", s, "all_reduce async") for s in range(1, STEPS)]
            + [("sync", s, "cpu") for s in range(2, STEPS + 1)]), json.dumps(flags, indent=1)
        if stage:  # and DeepSpeed's own collectives and overflow check inside the steps, set aside
            assert counts.get("deepspeed/collective/step", 0) >= STEPS - 1
            assert counts.get("deepspeed/sync/step", 0) >= STEPS - 1
