"""One-process trainings through launch/train.py (real shards, real checkpoints, real signals)."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from tests.helpers import trainer as h


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """8 uninterrupted steps, a checkpoint every 2, every consumed batch traced."""
    out = tmp_path_factory.mktemp("baseline")
    (out / "trace").mkdir()
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={out}/run", "train.total_steps=8",
                           "checkpoint.every_steps=2", "checkpoint.keep=10"]),
              h.env(DDPM_TRACE_BATCHES_DIR=str(out / "trace")))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_uninterrupted_run_writes_layout(baseline):
    run = baseline / "run"
    assert h.complete_steps(run) == [2, 4, 6, 8]
    assert (run / "TRAINING_DONE").read_text().strip() == "8"
    last = run / "step-00000008"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 8 and meta["images_seen"] == 64 and meta["finished"] is True and meta["world_size"] == 1
    assert (last / "data.json").is_file() and (last / "config.yaml").is_file()
    p, e = h.params(last), h.ema(last)
    assert set(e) == {k.removeprefix("net.") for k in p}  # the EMA is the U-Net's state_dict
    assert all(torch.isfinite(v).all() for v in p.values())
    assert not h.same(h.params(run / "step-00000002"), p)  # it trained


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise(baseline, shards, tmp_path):
    (tmp_path / "trace").mkdir()
    cmd = h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}/run", "train.total_steps=8",
                       "checkpoint.every_steps=2", "checkpoint.keep=10"])
    environ = h.env(DDPM_TRACE_BATCHES_DIR=str(tmp_path / "trace"))
    # The run stalls once checkpoint 4 is written (a test hook), so the kill lands there however fast it trains.
    proc = h.start(cmd, {**environ, "DDPM_FAULT_STALL_AFTER_STEP": "4"}, tmp_path / "killed.log")
    h.wait_for(lambda: 4 in h.complete_steps(tmp_path / "run"), 240, proc, "checkpoint 4")
    h.kill_group(proc, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    killed_at = max(h.complete_steps(tmp_path / "run"))
    assert killed_at == 4
    r = h.run(cmd, environ)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {killed_at}" in r.stdout
    a, b = baseline / "run" / "step-00000008", tmp_path / "run" / "step-00000008"
    assert h.same(h.params(a), h.params(b))
    assert h.same(h.ema(a), h.ema(b))
    assert h.trace(baseline / "trace") == h.trace(tmp_path / "trace")  # same batches, same order
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75_then_resumes(shards, tmp_path):
    (tmp_path / "trace").mkdir()
    base = [f"data.shards={shards}", f"train.out_dir={tmp_path}/run", "checkpoint.every_steps=1000"]
    proc = h.start(h.train_cmd([*base, "train.total_steps=1000"]),
                   h.env(DDPM_TRACE_BATCHES_DIR=str(tmp_path / "trace")), tmp_path / "term.log")
    trace = tmp_path / "trace" / "rank-0.txt"
    h.wait_for(lambda: trace.is_file() and len(trace.read_text().splitlines()) >= 3, 240, proc, "3 steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 75, (tmp_path / "term.log").read_text()[-3000:]
    steps = h.complete_steps(tmp_path / "run")
    assert len(steps) == 1 and 3 <= steps[0] < 1000
    meta = json.loads((tmp_path / "run" / f"step-{steps[0]:08d}" / "meta.json").read_text())
    assert meta["finished"] is False and meta["images_seen"] == 8 * steps[0]
    assert not (tmp_path / "run" / "TRAINING_DONE").exists()
    r = h.run(h.train_cmd([*base, f"train.total_steps={steps[0] + 2}"]), h.env())
    assert r.returncode == 0 and f"at step {steps[0]}" in r.stdout, r.stderr[-3000:]
    assert h.complete_steps(tmp_path / "run") == [steps[0], steps[0] + 2]


def test_nan_step_is_skipped_and_never_reaches_weights_or_ema(shards, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.total_steps=4",
                           "checkpoint.every_steps=1", "checkpoint.keep=10"]),
              h.env(DDPM_FAULT_NAN_AT_STEP="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "non-finite 1" in r.stdout
    (tick,) = [line for line in r.stdout.splitlines() if line.startswith("step 4/4")]
    assert math.isfinite(float(tick.split("loss ")[1].split()[0]))  # the skipped step's NaN is not logged
    s2, s3, s4 = (tmp_path / f"step-0000000{i}" for i in (2, 3, 4))
    assert h.same(h.params(s2), h.params(s3)) and h.same(h.ema(s2), h.ema(s3))  # step 3 skipped
    assert not h.same(h.params(s3), h.params(s4))  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in [*h.params(s4).values(), *h.ema(s4).values()])


def test_nan_in_a_row_stops_with_clear_error(shards, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.total_steps=8",
                           "train.max_nonfinite_in_row=2", "logging.every_steps=4"]),
              h.env(DDPM_FAULT_NAN_AT_STEP="2,3"))
    assert r.returncode == 1
    assert "2 in a row >= train.max_nonfinite_in_row=2" in r.stderr
    assert not (tmp_path / "TRAINING_DONE").exists()


def test_bf16_trains_on_cpu_with_fp32_weights(shards, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.total_steps=4",
                           "train.mixed_precision=bf16", "checkpoint.every_steps=2"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    p2, p4 = h.params(tmp_path / "step-00000002"), h.params(tmp_path / "step-00000004")
    assert all(v.dtype == torch.float32 for v in p4.values()) and not h.same(p2, p4)


def test_fp16_on_cpu_is_refused(shards, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.mixed_precision=fp16"]),
              h.env())
    assert r.returncode == 2
    assert "train.mixed_precision=fp16 needs a CUDA GPU" in r.stderr and "bf16" in r.stderr


@pytest.mark.parametrize(("override", "message"), [
    ("train.micro_batch_per_gpu=3", "train.batch_size=8 is not divisible by train.micro_batch_per_gpu=3"),
    ("train.nonfinite_policy=ignore", "train.nonfinite_policy='ignore' is not allowed"),
    ("train.no_such_key=1", "no_such_key"),
    ("optimizer.lr=nan", "optimizer.lr=nan must be a finite number > 0"),
    ("optimizer.grad_clip=nan", "optimizer.grad_clip=nan must be a finite number >= 0"),
    ("optimizer.adam_eps=-1", "optimizer.adam_eps=-1.0 must be > 0"),
    ("optimizer.adam_beta1=1.0", "optimizer.adam_beta1=1.0 must lie in [0, 1)"),
])
def test_invalid_config_exits_2_naming_the_key(shards, tmp_path, override, message):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", override]), h.env())
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_checkpoint_of_other_model_is_refused(baseline, shards, tmp_path):
    import shutil

    shutil.copytree(baseline / "run" / "step-00000008", tmp_path / "step-00000008")
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.total_steps=10",
                           "model.base_channels=64", "model.num_res_blocks=2"]), h.env())
    assert r.returncode == 2
    assert "model.base_channels: checkpoint 32, now 64" in r.stderr
    assert "model.num_res_blocks: checkpoint 1, now 2" in r.stderr


@pytest.mark.slow
def test_tracking_sqlite_store_gets_params_metrics_samples_and_resume_continues_the_run(shards, tmp_path):
    # out_dir tmp_path/run: the default store is its parent's, tmp_path/mlflow.db
    base = [f"data.shards={shards}", f"train.out_dir={tmp_path}/run", "tracking.enabled=true", "tracking.experiment=t",
            "logging.sample_every_steps=2", "logging.sample_grid_images=4", "logging.sample_ddim_steps=2"]
    r = h.run(h.train_cmd([*base, "train.total_steps=4"], script=h.LAUNCH), h.env())  # its mlflow.source.name
    assert r.returncode == 0, r.stderr[-3000:]
    r = h.run(h.train_cmd([*base, "train.total_steps=6"], script=h.LAUNCH), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1  # the resumed job continued the run
    run = runs[0]
    meta = json.loads((tmp_path / "run" / "step-00000006" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["world_size"] == "1"
    assert run.data.params["model.channel_mult"] == "[1, 2]" and "git_commit" not in run.data.params
    assert run.data.tags["mlflow.source.name"] == "launch/train.py"  # MLflow's source tags instead
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in hist] == [2, 4, 6] and all(0 < m.value < 10 for m in hist)
    for key in ("train/loss_q1", "train/lr", "train/grad_norm", "train/images_per_s", "train/data_wait_s",
                "train/step_time_s", "train/tflops_per_device"):  # no train/mfu on a CPU: no peak to divide by
        assert key in run.data.metrics
    assert "train/mfu" not in run.data.metrics and run.data.metrics["train/tflops_per_device"] > 0
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert "config.yaml" in arts
    assert sum("samples~ema" in p and p.endswith(".png") for p in images) == 3  # steps 2, 4, 6


def test_non_finite_weights_are_never_checkpointed_and_the_run_does_not_finish(shards, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.total_steps=8",
                           "checkpoint.every_steps=2", "checkpoint.keep=10"]),
              h.env(DDPM_FAULT_NAN_WEIGHTS_AT_STEP="4"))
    assert r.returncode == 1
    assert "the weights or the EMA hold NaN/inf at step 4: checkpoint not written" in r.stderr
    assert f"The previous checkpoint, {tmp_path / 'step-00000002'}, is intact" in r.stderr  # verified, not assumed
    assert h.complete_steps(tmp_path) == [2] and not list(tmp_path.glob(".tmp-*"))
    assert not (tmp_path / "TRAINING_DONE").exists()


def _malicious_pickle(path, marker):
    """A file that, when unpickled by anything but a weights-only loader, creates ``marker``."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Payload()}, path)


def _reseal(ckpt, rel):
    """Record the tampered file's sha256 in meta.json, as an attacker with write access would."""
    from pipeline.data.manifest import sha256_file

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"][rel] = sha256_file(ckpt / rel)
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize("rel", ["accelerate/optimizer.bin", "accelerate/random_states_0.pkl",
                                 "accelerate/model.safetensors"])
def test_a_checkpoint_file_that_is_a_malicious_pickle_is_refused_not_run(baseline, shards, tmp_path, rel):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline / "run" / "step-00000008", run / "step-00000008")
    marker = tmp_path / "pwned"
    _malicious_pickle(run / "step-00000008" / rel, marker)
    # unsealed: the sha256 check finds it first, and resume=auto has nothing older to fall back to
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={run}", "train.total_steps=10"]), h.env())
    assert r.returncode == 2 and f"fails verification: {rel} has sha256" in r.stderr, r.stderr[-2000:]
    assert "no complete checkpoint" in r.stderr and not marker.exists()
    # resealed: only the weights-only loading stands between the file and the interpreter
    _reseal(run / "step-00000008", rel)
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={run}", "train.total_steps=10"]), h.env())
    assert r.returncode == 2, r.stderr[-2000:]
    # a pickle is refused by the weights-only unpickler before anything loads; a pickle where safetensors were
    # expected does not parse
    expected = ("cannot be loaded" if rel.endswith(".safetensors") else
                f"{rel} is not plain weights (WeightsUnpickler error: Unsupported global")
    assert expected in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_saved_before_its_run_existed_still_belongs_to_that_one_run(shards, tmp_path):
    """meta.json can hold mlflow_run_id null when the first checkpoint is written before the run exists (a
    slow store): the run is also recorded in out_dir/mlflow_run.json, which resume and evaluation read."""
    from mlflow.tracking import MlflowClient

    from evaluation.evaluate import evaluate

    base = [f"data.shards={shards}", f"train.out_dir={tmp_path}", "tracking.enabled=true",
            "tracking.experiment=t", "checkpoint.every_steps=2", "logging.every_steps=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # not the default, the parent's: shared by tests
    assert h.run(h.train_cmd([*base, "train.total_steps=2"]), h.env()).returncode == 0
    ckpt = tmp_path / "step-00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    recorded = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert meta["mlflow_run_id"] == recorded["run_id"]
    meta["mlflow_run_id"] = None  # as the slow store left it
    (ckpt / "meta.json").write_text(json.dumps(meta))
    result = evaluate(ckpt, ["eval.feature_extractor=digits", "eval.num_samples=8", "eval.steps=2",
                             "eval.bpd_max_images=4", "eval.bpd_timesteps=2", "eval.kid_subset_size=4",
                             "eval.kid_subsets=2"])
    assert result.logged_to_run == recorded["run_id"]
    r = h.run(h.train_cmd([*base, "train.total_steps=4"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert [run.info.run_id for run in runs] == [recorded["run_id"]] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(recorded["run_id"], "train/loss")] == [2, 4]
    assert "eval/fid_digits" in runs[0].data.metrics
    assert json.loads((tmp_path / "step-00000004" / "meta.json").read_text())["mlflow_run_id"] == recorded["run_id"]


@pytest.mark.slow
def test_a_run_left_running_by_a_killed_job_is_marked_when_the_training_starts_again(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    base = [f"data.shards={shards}", f"train.out_dir={tmp_path}", "tracking.enabled=true", "tracking.experiment=t",
            "checkpoint.every_steps=1000", "logging.every_steps=1000",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # not the default, the parent's: shared by tests
    proc = h.start(h.train_cmd([*base, "train.total_steps=100000"]), h.env(), tmp_path.parent / "killed.log")
    try:
        h.wait_for(lambda: (tmp_path / "mlflow_run.json").is_file(), 120, proc, "the run to be created")
    finally:
        h.kill_group(proc)
        proc.wait()
    dead = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert not h.complete_steps(tmp_path)  # killed before its first checkpoint: the next job starts afresh
    r = h.run(h.train_cmd([*base, "train.total_steps=2"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    new = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    old = client.get_run(dead)
    assert new != dead and old.info.status == "KILLED" and old.data.tags["ddpm.superseded_by"] == new
    assert client.get_run(new).info.status == "FINISHED"


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_checkpoint(shards, tmp_path):
    import os
    import subprocess

    small = tmp_path / "small"  # room for one checkpoint of the tiny net (~11 MB), not two
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={small}", "train.total_steps=8",
                               "checkpoint.every_steps=2", "checkpoint.keep=10"]), h.env())
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"no space left on {small} while writing checkpoint .tmp-step-00000004" in r.stderr
        assert f"The previous checkpoint, {small / 'step-00000002'}, is intact" in r.stderr
        assert "Traceback" not in r.stderr
        assert h.complete_steps(small) == [2] and not list(small.glob(".tmp-*"))
        assert not (small / "TRAINING_DONE").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)
