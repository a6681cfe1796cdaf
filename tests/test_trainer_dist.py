"""Multi-process trainings: 2 gloo processes, two "nodes" on 127.0.0.1, DeepSpeed ZeRO-2/3 (all real launches)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.helpers import trainer as h

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def same_shards(tmp_path_factory):
    # One image repeated: the global batch is the same whatever the split over ranks, so 2 ranks x 4 must
    # equal 1 rank x (2 accumulation steps x 4). t/noise/dropout follow the micro-batch's global index.
    return h.prepare_identical(tmp_path_factory.mktemp("same") / "shards")


@pytest.fixture(scope="module")
def one_process(same_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    (out / "trace").mkdir()
    r = h.run(h.train_cmd([f"data.shards={same_shards}", f"train.out_dir={out}/run", "train.total_steps=4",
                           "train.micro_batch_per_gpu=4"]),
              h.env(DDPM_TRACE_BATCHES_DIR=str(out / "trace")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "micro batch 4, accumulation 2" in r.stdout
    return out / "run" / "step-00000004"


def _assert_matches_one_process(ckpt, one, trace_dir):
    assert "params" in h.digests(trace_dir, 0)
    assert h.digests(trace_dir, 0) == h.digests(trace_dir, 1)  # identical on every rank
    assert h.max_diff(h.params(ckpt), h.params(one)) < 1e-5  # fp32 summation order differs, nothing else
    assert h.max_diff(h.ema(ckpt), h.ema(one)) < 1e-5


def test_two_gloo_processes_equal_one_process(same_shards, one_process, tmp_path):
    (tmp_path / "trace").mkdir()
    r = h.run(h.train_cmd([f"data.shards={same_shards}", f"train.out_dir={tmp_path}/run", "train.total_steps=4",
                           "train.micro_batch_per_gpu=4"], nproc=2),
              h.launch_env(multi=True, DDPM_TRACE_BATCHES_DIR=str(tmp_path / "trace")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2, micro batch 4, accumulation 1" in r.stdout
    _assert_matches_one_process(tmp_path / "run" / "step-00000004", one_process, tmp_path / "trace")


def test_two_nodes_on_loopback(same_shards, one_process, tmp_path):
    (tmp_path / "trace").mkdir()
    port = h.free_port()
    over = [f"data.shards={same_shards}", f"train.out_dir={tmp_path}/run", "train.total_steps=4",
            "train.micro_batch_per_gpu=4"]
    environ = h.launch_env(multi=True, DDPM_TRACE_BATCHES_DIR=str(tmp_path / "trace"))
    nodes = [h.start(h.train_cmd(over, nproc=2, machines=2, machine_rank=r, port=port), environ,
                     tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        codes = [p.wait(300) for p in nodes]
    finally:
        for p in nodes:
            h.kill_group(p)
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:] + (tmp_path / "node1.log").read_text()[-3000:]
    assert "world 2" in (tmp_path / "node0.log").read_text()
    _assert_matches_one_process(tmp_path / "run" / "step-00000004", one_process, tmp_path / "trace")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


def test_two_process_resume_after_sigkill_is_bitwise(digits, tmp_path):
    runs = {}
    for name in ("straight", "killed"):
        (tmp_path / name / "trace").mkdir(parents=True)
        cmd = h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}/{name}/run", "train.total_steps=8",
                           "checkpoint.every_steps=2", "checkpoint.keep=10"], nproc=2,
                          port=h.free_port())
        environ = h.launch_env(multi=True, DDPM_TRACE_BATCHES_DIR=str(tmp_path / name / "trace"))
        if name == "killed":
            # Both ranks stall once checkpoint 4 is written (a test hook): the kill lands there however fast
            # the steps are (polling for the checkpoint once let the run finish first).
            proc = h.start(cmd, {**environ, "DDPM_FAULT_STALL_AFTER_STEP": "4"}, tmp_path / "killed.log")
            h.wait_for(lambda: 4 in h.complete_steps(tmp_path / "killed" / "run"), 300, proc, "checkpoint 4")
            workers = h.workers(proc)  # torchrun's workers live in sessions of their own: kill them too
            assert len(workers) == 2
            h.kill_group(proc, signal.SIGKILL)
            h.signal_pids(workers.values(), signal.SIGKILL)
            proc.wait(30)
            pids = list(workers.values())
            h.wait_for(lambda: not any(h.alive(pid) for pid in pids), 30, None, "the workers' end")  # noqa: B023
            assert max(h.complete_steps(tmp_path / "killed" / "run")) == 4
            cmd[cmd.index("--main_process_port") + 1] = str(h.free_port())
        r = h.run(cmd, environ)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    a, b = runs["straight"] / "run" / "step-00000008", runs["killed"] / "run" / "step-00000008"
    assert h.same(h.params(a), h.params(b)) and h.same(h.ema(a), h.ema(b))
    for rank in (0, 1):
        assert h.trace(runs["straight"] / "trace", rank) == h.trace(runs["killed"] / "trace", rank)
        assert h.digests(runs["straight"] / "trace", rank) == h.digests(runs["killed"] / "trace", rank)
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())
    assert h.trace(runs["straight"] / "trace", 0) != h.trace(runs["straight"] / "trace", 1)  # ranks split data


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_bf16_train_checkpoint_resume_ema(digits, tmp_path, stage):
    """ema_decay=0: the EMA must equal DeepSpeed's fp32 master weights (not the bf16 module, not a partition)."""
    over = [f"data.shards={digits}", "train.mixed_precision=bf16", "train.micro_batch_per_gpu=4",
            "ema.decay=0.0", "checkpoint.every_steps=2", "checkpoint.keep=10"]
    environ = h.launch_env(deepspeed=True)
    straight = h.run(h.train_cmd([*over, f"train.out_dir={tmp_path}/a", "train.total_steps=4"], nproc=2,
                                 deepspeed_stage=stage, mixed_precision="bf16"), environ)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = h.run(h.train_cmd([*over, f"train.out_dir={tmp_path}/b", "train.total_steps=2"], nproc=2,
                              deepspeed_stage=stage, mixed_precision="bf16"), environ)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = h.run(h.train_cmd([*over, f"train.out_dir={tmp_path}/b", "train.total_steps=4"], nproc=2,
                                deepspeed_stage=stage, mixed_precision="bf16"), environ)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-3000:]
    for step in (2, 4):
        ckpt = tmp_path / "a" / f"step-{step:08d}"
        master, ema = h.deepspeed_fp32(ckpt), h.ema(ckpt)
        assert set(master) == set(ema)
        assert all(ema[k].dtype == torch.float32 and torch.equal(ema[k], master[k]) for k in ema)
        assert any(not torch.equal(master[k], master[k].bfloat16().float()) for k in master)  # truly fp32
    a, b = tmp_path / "a" / "step-00000004", tmp_path / "b" / "step-00000004"
    assert h.max_diff(h.deepspeed_fp32(a), h.deepspeed_fp32(b)) == 0.0
    assert h.same(h.ema(a), h.ema(b))
    assert not h.same(h.ema(tmp_path / "a" / "step-00000002"), h.ema(a))
