"""Faults around real trainings: a tracking server that dies mid-run, preemption signals to a 2-process
gloo run (then an exact resume), and a non-finite step under DeepSpeed ZeRO-2.

All launches are real (accelerate launch, torchrun workers, a real ``mlflow server`` on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.config import flatten, load_config, to_yaml
from pipeline.train.preemption import PREEMPTED_EXIT_CODE
from pipeline.train.step import lr_at
from tests.helpers import trainer as h
from tests.helpers.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


def _wait_exit(proc: subprocess.Popen, log, timeout_s: float = 300) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        h.kill_group(proc)
        for pid in h.workers(proc).values():
            h.signal_pids([pid], signal.SIGKILL)
        raise AssertionError(f"launch did not end within {timeout_s} s:\n{log.read_text()[-3000:]}") from None


# ---- preemption: SIGTERM / SIGUSR1 to the training processes of a 2-process launch ------------------

PREEMPT_TOTAL_STEPS = 160  # ~8 s of training here: the signal (sent after the first step) lands long before the end
SLOW_STEP_S = 3.0  # the slowed run's step time (DDPM_FAULT_STEP_SLEEP_S): a large model, ZeRO-3, a small allocation


def _preempt_cmd(digits, out, total_steps=PREEMPT_TOTAL_STEPS, check_every=1, extra=()) -> list[str]:
    return h.train_cmd([f"data.shards={digits}", f"train.out_dir={out}/run", f"train.total_steps={total_steps}",
                        "checkpoint.every_steps=1000", f"preemption.check_every_steps={check_every}", *extra],
                       nproc=2, port=h.free_port())


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    (out / "trace").mkdir()
    r = h.run(_preempt_cmd(digits, out), h.launch_env(multi=True, DDPM_TRACE_BATCHES_DIR=str(out / "trace")))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _signal_until_exit(proc: subprocess.Popen, pids: list[int], sig: int, every_s: float = 0.02) -> None:
    while proc.poll() is None:
        h.signal_pids([p for p in pids if h.alive(p)], sig)
        time.sleep(every_s)


def _trace_steps(trace_dir, rank) -> list[int]:
    return sorted({step for step, _ in h.trace(trace_dir, rank)})


@pytest.mark.parametrize(("sig", "targets", "check_every", "slow"),
                         [(signal.SIGTERM, "all", 4, False), (signal.SIGUSR1, "rank1", 1, True)],
                         ids=["SIGTERM-all-workers-every-4", "SIGUSR1-rank1-only-3s-steps"])
def test_signal_to_workers_checkpoints_once_exits_75_and_resume_is_bitwise(digits, uninterrupted, tmp_path,
                                                                           sig, targets, check_every, slow):
    """The SLURM path (launch/slurm/node_task.sh): the signal goes to the training processes, not the launcher.

    SIGTERM is sent to every worker again and again until they are gone (an impatient scheduler, and what
    torchrun does to the slower rank once the first exits): a SIGTERM during interpreter shutdown used to
    kill a worker with -15 instead of its exit 75. The flags are exchanged every 4 steps there: the ranks stop
    one step after such an exchange. SIGUSR1 to rank 1 alone shows the agreement: rank 0 never saw a signal and
    still stops at the same step; its steps take ~3 s and the log tick is every 100 steps (as shipped), and the
    ranks still stop within 2 steps of the signal: the bound is in steps, not log ticks.
    """
    (tmp_path / "trace").mkdir()
    environ = h.launch_env(multi=True, DDPM_TRACE_BATCHES_DIR=str(tmp_path / "trace"))
    log = tmp_path / "preempted.log"
    slow_env = {"DDPM_FAULT_STEP_SLEEP_S": str(SLOW_STEP_S)} if slow else {}
    proc = h.start(_preempt_cmd(digits, tmp_path, check_every=check_every,
                                extra=["logging.every_steps=100"] if slow else []), environ | slow_env, log)
    traces = [tmp_path / "trace" / f"rank-{r}.txt" for r in (0, 1)]
    # A first traced batch on both ranks: the handlers are installed (before the loop), training runs.
    h.wait_for(lambda: all(t.is_file() and t.stat().st_size for t in traces), 240, proc, "the first step")
    workers = h.workers(proc)
    assert sorted(workers) == [0, 1], workers
    if targets == "all":
        repeats = threading.Thread(target=_signal_until_exit, args=(proc, list(workers.values()), sig), daemon=True)
        repeats.start()
    else:
        h.signal_pids([workers[1]], sig)
    signalled_at = time.monotonic()
    begun = max(_trace_steps(tmp_path / "trace", 1)) + 1  # steps begun on rank 1 by then (one may be sleeping)
    code = _wait_exit(proc, log)
    exited_s = time.monotonic() - signalled_at
    text = log.read_text()
    # accelerate launch (torchrun) reports the workers' exit 75 as ChildFailedError and exits 1 itself
    # (docs/training.md); every training process exited 75 on its own, none was killed by a signal.
    assert code == 1, text[-3000:]
    assert h.torchrun_failures(text) == {r: (PREEMPTED_EXIT_CODE, pid) for r, pid in workers.items()}, text[-3000:]
    assert not any(h.alive(pid) for pid in workers.values())

    # One complete checkpoint, at a step both ranks agreed on, with both ranks' loader positions.
    run = tmp_path / "run"
    steps = h.complete_steps(run)
    assert len(steps) == 1, steps
    step = steps[0]
    assert 0 < step < PREEMPT_TOTAL_STEPS and step % check_every == 1 % check_every  # one step after an exchange
    if slow:  # the step in progress at the signal, 2 more at most (its exchange may have just left), the checkpoint
        assert step <= begun + 2, (step, begun)
        checkpoint_s = float(re.search(r"checkpoint \S+ written in ([0-9.]+) s", text).group(1))
        print(f"preemption latency with {SLOW_STEP_S:g} s steps: signal after {begun} steps began, checkpoint at "
              f"step {step}, all exited {exited_s:.1f} s after the signal (checkpoint {checkpoint_s:.1f} s)")
        assert exited_s <= (step - begun + 1) * SLOW_STEP_S + checkpoint_s + 15, text[-3000:]  # + exit, teardown
    assert f"checkpoint at step {step}, exiting with {PREEMPTED_EXIT_CODE}" in text
    assert not list(run.glob(".tmp-*")) and not (run / "TRAINING_DONE").exists()
    ckpt = run / f"step-{step:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == step and meta["world_size"] == 2 and meta["finished"] is False
    assert meta["images_seen"] == 8 * step
    position = json.loads((ckpt / "data.json").read_text())  # the loader's position: both ranks' streams
    assert position["world_size"] == 2 and len(position["streams"]) == 2 * position["num_workers"]
    for rank in (0, 1):
        assert _trace_steps(tmp_path / "trace", rank) == list(range(step))  # no rank ran a step past it
        assert (ckpt / "accelerate" / f"random_states_{rank}.pkl").is_file()

    # resume=auto continues from it (at full speed) and ends bitwise where the uninterrupted run ended.
    r = h.run(_preempt_cmd(digits, tmp_path, check_every=check_every), environ)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in r.stdout
    a = uninterrupted / "run" / f"step-{PREEMPT_TOTAL_STEPS:08d}"
    b = run / f"step-{PREEMPT_TOTAL_STEPS:08d}"
    assert h.same(h.params(a), h.params(b)) and h.same(h.ema(a), h.ema(b))
    for rank in (0, 1):
        assert h.trace(uninterrupted / "trace", rank) == h.trace(tmp_path / "trace", rank)  # same batches
        assert h.digests(uninterrupted / "trace", rank) == h.digests(tmp_path / "trace", rank)


# ---- a real mlflow server that dies mid-run ---------------------------------------------------------

TRACKED_TOTAL_STEPS = 60
LOG_EVERY, SAMPLE_EVERY = 5, 10
TRAIN_METRICS = ("train/loss", "train/loss_q1", "train/loss_q2", "train/loss_q3", "train/loss_q4", "train/lr",
                 "train/grad_norm", "train/images_per_s", "train/step_time_s", "train/data_wait_s",
                 "train/nonfinite_steps", "train/tflops_per_device")


def _server_progress(client, experiment: str) -> tuple[int, int]:
    """(newest step of train/loss, newest step of a samples/ema image) the server has; (-1, -1) before."""
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if not runs:
            return -1, -1
        run_id = runs[0].info.run_id
        loss = max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=-1)
        images = [_image_step(a.path) for a in client.list_artifacts(run_id, "images")]
        return loss, max((s for s in images if s is not None), default=-1)
    except Exception:  # the server is still starting or busy: not there yet
        return -1, -1


def _image_step(path: str) -> int | None:
    m = re.search(r"samples~ema\+step\+(\d+)\+.*\.png$", path)
    return int(m.group(1)) if m else None


def test_mlflow_server_gets_params_metrics_images_and_its_death_mid_run_costs_only_a_warning(digits, tmp_path):
    from mlflow import MlflowClient

    overrides = [f"data.shards={digits}", f"train.out_dir={tmp_path}/run", f"train.total_steps={TRACKED_TOTAL_STEPS}",
                 f"logging.every_steps={LOG_EVERY}", f"logging.sample_every_steps={SAMPLE_EVERY}",
                 "logging.sample_grid_images=4", "logging.sample_ddim_steps=2", "checkpoint.every_steps=20",
                 "checkpoint.keep=10", "tracking.enabled=true", "tracking.experiment=faults",
                 "tracking.timeout_s=2", "tracking.probe_interval_s=1", "tracking.flush_timeout_s=10"]
    root = tmp_path / "server"
    log = tmp_path / "train.log"
    with mlflow_server(root) as server:
        proc = h.start(h.train_cmd(overrides, nproc=2),
                       h.launch_env(multi=True, MLFLOW_TRACKING_URI=server.uri), log)
        workers: dict[int, int] = {}
        try:
            client = MlflowClient(server.uri)
            seen: list[tuple[int, int]] = []
            h.wait_for(lambda: (seen.append(_server_progress(client, "faults")) or min(seen[-1]) >= SAMPLE_EVERY),
                       240, proc, "metrics and a sample image on the server")
            seen_loss_step, seen_image_step = seen[-1]
            # Freeze the training while the server goes down, so that the outage is mid-run whatever the
            # speed of this machine; it resumes with the server gone for good.
            workers = h.workers(proc)
            assert sorted(workers) == [0, 1]
            h.signal_pids(workers.values(), signal.SIGSTOP)
            server.stop()
            assert not server.alive()
        finally:
            h.signal_pids(workers.values(), signal.SIGCONT)
        code = _wait_exit(proc, log)
    text = log.read_text()

    # The training finished as if nothing happened: exit 0 at total_steps, every checkpoint complete.
    assert code == 0, text[-3000:]
    run_dir = tmp_path / "run"
    assert h.complete_steps(run_dir) == [20, 40, 60]
    assert (run_dir / "TRAINING_DONE").read_text().strip() == str(TRACKED_TOTAL_STEPS)
    assert "Training goes on" in text  # the sink's outage warning
    dropped = re.search(r"finished; (\d+) metric values were dropped", text)
    assert dropped and int(dropped.group(1)) >= len(TRAIN_METRICS), text[-3000:]

    # What reached the server before it died is in its store (read directly: the server is gone).
    store = MlflowClient(f"sqlite:///{root / 'server.db'}")
    runs = store.search_runs([store.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1  # rank 0 only
    run = runs[0]
    assert run.info.status == "RUNNING"  # finish() could not reach the server either
    meta = json.loads((run_dir / f"step-{TRACKED_TOTAL_STEPS:08d}" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id and meta["mlflow_tracking_uri"] == server.uri

    cfg = load_config(str(h.REPO / "configs" / "digits.yaml"), [*h.TINY, *overrides])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=h.REPO, capture_output=True, text=True).stdout.strip()
    expected = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
    expected |= {"world_size": "2", "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
    assert run.data.params == expected
    assert run.data.tags.get("mlflow.source.git.commit", "") == commit  # MLflow's source tag, not a param

    loss_steps = [m.step for m in store.get_metric_history(run.info.run_id, "train/loss")]
    last = max(loss_steps)
    assert seen_loss_step <= last < TRACKED_TOTAL_STEPS  # logged before the stop, nothing after
    assert sorted(loss_steps) == list(range(LOG_EVERY, last + 1, LOG_EVERY))  # every tick up to there, once
    for key in TRAIN_METRICS:
        history = {m.step: m.value for m in store.get_metric_history(run.info.run_id, key)}
        assert sorted(history) == sorted(loss_steps), key
        assert all(np.isfinite(v) for v in history.values()), key
    lr = {m.step: m.value for m in store.get_metric_history(run.info.run_id, "train/lr")}
    assert lr == {s: lr_at(s - 1, cfg.optimizer.lr, cfg.optimizer.warmup_steps) for s in loss_steps}
    assert all(m.value == 0 for m in store.get_metric_history(run.info.run_id, "train/nonfinite_steps"))

    # Sample grids and the config, as the server stored them (artifacts served over HTTP, on disk here).
    arts = root / "server-artifacts"
    pngs = {_image_step(p.name): p for p in arts.rglob("*.png") if _image_step(p.name) is not None}
    assert seen_image_step in pngs
    assert sorted(pngs) == list(range(SAMPLE_EVERY, max(pngs) + 1, SAMPLE_EVERY)) and max(pngs) <= last
    grid = np.asarray(Image.open(pngs[seen_image_step]))
    # 2 x 2 tiles of 8 x 8 enlarged 16x (to >= 256 px wide) with 2-pixel padding
    assert grid.shape == (262, 262, 3) and grid.dtype == np.uint8
    assert grid[2:130, 2:130].std() > 0  # a tile holds an image, not padding
    configs = list(arts.rglob("config.yaml"))
    assert len(configs) == 1 and configs[0].read_text() == to_yaml(cfg)


# ---- a non-finite step under DeepSpeed ZeRO-2 -------------------------------------------------------
# The skipped step itself (fp32 master weights, Adam moments and step count, every EMA, fp32 and bf16) is checked
# on the ZeRO-2 launches of tests/test_ema_dist.py, which inject the same NaN; here: the check cannot be turned off.


def test_deepspeed_config_that_disables_the_nonfinite_check_is_refused(digits, tmp_path):
    """With bf16.check_grad_overflow=false, ZeRO-2 applies a NaN step (its fp32 master weights and our EMA
    become NaN, exit 0, no non-finite step counted: checked by hand); the trainer refuses it at start."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto", "check_grad_overflow": False},
        "zero_optimization": {"stage": 2},
    }))
    script = h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}/run", "train.mixed_precision=bf16",
                          "train.total_steps=2"])[1:]  # the training script and its arguments
    cmd = [h.ACCELERATE, "launch", "--use_deepspeed", "--deepspeed_config_file", str(ds_config),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(h.free_port()),
           "--mixed_precision", "bf16", "--dynamo_backend", "no", *script]
    r = h.run(cmd, h.launch_env(deepspeed=True), real=True)
    assert r.returncode == 1, r.stderr[-3000:]  # the launcher's status when its workers fail
    failures = h.torchrun_failures(r.stderr)
    assert failures.keys() == {0, 1}, r.stderr[-3000:]
    # Each rank refuses on its own; once the first has exited 2, torchrun stops a rank still on its way there
    # with SIGTERM (-15, recorded after the first failure). Nothing else is an acceptable way to end.
    codes = {rank: code for rank, (code, _) in failures.items()}
    assert set(codes.values()) <= {2, -signal.SIGTERM} and 2 in codes.values(), codes
    for rank, code in codes.items():
        if code == 2:  # invalid configuration, said by that rank
            assert f"[rank {rank}] error: the DeepSpeed config sets bf16.check_grad_overflow to false" in r.stderr
    assert h.complete_steps(tmp_path / "run") == [] and not re.search(r"^step \d+/", r.stdout, re.M)


# ---- a DeepSpeed checkpoint whose files are malicious pickles: refused, never run ------------------------

@pytest.mark.parametrize(("stage", "files"), [
    (2, ["pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    (3, ["pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt"]),
])
def test_deepspeed_checkpoint_with_a_malicious_pickle_is_refused_on_every_rank(digits, tmp_path, stage, files):
    """DeepSpeed's own checkpoint engine unpickles with weights_only=False; ours loads weights-only. The tampered
    file's sha256 is resealed into meta.json, as an attacker with write access would, so only the weights-only
    loading stands between the payload and the interpreter."""
    from pipeline.data.manifest import sha256_file
    from tests.test_trainer_run import _malicious_pickle

    cmd = h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}/run", "train.total_steps=2",
                       "train.micro_batch_per_gpu=4", "checkpoint.every_steps=2"], nproc=2, deepspeed_stage=stage)
    r = h.run(cmd, h.launch_env(deepspeed=True))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "run" / "step-00000002"
    original = {rel: (ckpt / "accelerate" / rel).read_bytes() for rel in files}
    original_meta = (ckpt / "meta.json").read_text()
    assert all(original.values()), "the test names files this DeepSpeed version does not write"
    for rel in files:
        marker = tmp_path / f"pwned-{rel.replace('/', '_')}"
        _malicious_pickle(ckpt / "accelerate" / rel, marker)
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["sha256"][f"accelerate/{rel}"] = sha256_file(ckpt / "accelerate" / rel)
        (ckpt / "meta.json").write_text(json.dumps(meta))
        r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}/run", "train.total_steps=4",
                               "train.micro_batch_per_gpu=4", "checkpoint.every_steps=2"], nproc=2,
                              deepspeed_stage=stage), h.launch_env(deepspeed=True), real=True)  # torchrun's report
        assert not marker.exists(), f"{rel}: the payload ran"
        codes = {rank: code for rank, (code, _) in h.torchrun_failures(r.stderr).items()}
        assert r.returncode != 0 and 2 in codes.values() and set(codes.values()) <= {2, -signal.SIGTERM}, \
            r.stderr[-3000:]
        said = r.stdout + r.stderr  # DeepSpeed's launcher passes the workers' output on through its stdout
        assert f"accelerate/{rel} is not plain weights (WeightsUnpickler error: Unsupported global" in said, said[-3000:]
        assert h.complete_steps(tmp_path / "run") == [2]  # nothing was trained on top of it
        (ckpt / "accelerate" / rel).write_bytes(original[rel])
        (ckpt / "meta.json").write_text(original_meta)
