"""The EMA model as an MLflow model (pipeline/tracking/mlflow_model.py, logged by pipeline/tracking/logged_model.py): logged by a real training into a real sqlite
store, registered, loaded back, served by a real ``mlflow models serve`` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.checkpoint.folder import EMA_FILE
from pipeline.data.manifest import sha256_file
from tests.helpers import trainer as h
from tests.helpers.evaluation import prepare_digits
from tests.helpers.mlflow_server import free_port

NAME = "tiny-ddpm"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A real training (2 steps) that logs its EMA model at the end and registers it (the default store)."""
    root = tmp_path_factory.mktemp("mlmodel")
    digits = prepare_digits(root / "data")
    run = root / "runs" / "tiny"
    r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={run}", "name=tiny", "train.total_steps=2",
                           "checkpoint.every_steps=2", "tracking.enabled=true", "tracking.experiment=models",
                           "tracking.log_model=true", f"tracking.registered_model_name={NAME}",
                           "eval.steps=4", "eval.batch_size=5"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from pipeline.tracking.sink import read_run_file

    # the run's id: in meta.json, or only in mlflow_run.json when the store was slow to create the run
    run_id = json.loads((run / "step-00000002" / "meta.json").read_text())["mlflow_run_id"]
    return SimpleNamespace(ckpt=run / "step-00000002", run_dir=run, uri=uri, stdout=r.stdout, digits=digits,
                           run_id=run_id or read_run_file(run)["run_id"])


@pytest.fixture(scope="module")
def model(trained):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{NAME}/1")


def test_the_training_logs_its_ema_model_into_its_run_at_its_step_and_registers_it(trained, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    assert f"registered as {NAME} version 1" in trained.stdout and "logged the EMA weights of step-00000002" in \
        trained.stdout
    client = MlflowClient(trained.uri)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"  # logging the model did not reopen the run
    [output] = run.outputs.model_outputs
    assert output.step == 2
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == trained.run_id and logged.experiment_id == run.info.experiment_id
    assert logged.tags["ddpm.step"] == "2" and logged.params["optimizer.lr"] == "0.001"
    assert {m.key for m in logged.metrics if m.step == 2} >= {"train/loss", "train/lr"}  # the run's metrics there
    version = client.get_model_version(NAME, "1")
    assert version.run_id == trained.run_id and version.source == f"models:/{output.model_id}"
    assert version.status == "READY"

    # a plain absolute path: a "//..." one (from sqlite:////abs) is a network path to MLflow's model server
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location == str(trained.run_dir.parent / "mlartifacts")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path)))
    assert sha256_file(local / "artifacts" / EMA_FILE) == sha256_file(trained.ckpt / EMA_FILE)  # the weights, as is
    assert (local / "code" / "pipeline" / "model" / "unet.py").is_file()  # the code travels with the model
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.bin"))  # nothing to unpickle at load


def test_the_loaded_model_draws_bitwise_the_images_evaluate_draws(trained, model, tmp_path):
    from evaluation.evaluate import evaluate

    def drawn(overrides: list[str]) -> np.ndarray:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.npz"
        evaluate(trained.ckpt, ["eval.num_samples=6", "eval.feature_extractor=none", "eval.bpd_split=''", *overrides],
                 save_samples_to=str(out), log_to_run=False)
        return np.load(out)["images"]

    got = model.predict(pd.DataFrame({"seed": range(6)}))  # the checkpoint's eval.* settings: DDIM 4 steps
    assert got.dtype == np.uint8 and got.shape == (6, 1, 8, 8)
    assert np.array_equal(got, drawn([]))
    got = model.predict(pd.DataFrame({"seed": range(3, 9)}), params={"steps": 3, "eta": 1.0})
    assert np.array_equal(got, drawn(["eval.seed=3", "eval.steps=3", "eval.eta=1.0"]))
    # a dict of seeds; image i depends on seed i (and the settings) only
    assert np.array_equal(model.predict({"seed": [4, 5]}, params={"steps": 3, "eta": 1.0}), got[1:3])


@pytest.mark.parametrize(("model_input", "params", "message"), [
    (pd.DataFrame({"seeds": [0]}), None, "seed"),
    (pd.DataFrame({"seed": [-1]}), None, "non-negative"),
    (pd.DataFrame({"seed": [0]}), {"steps": 0}, "steps=0"),
    (pd.DataFrame({"seed": [0]}), {"sampler": "euler"}, "sampler='euler'"),
    (pd.DataFrame({"seed": [0]}), {"eta": 2.0}, "eta=2.0"),
])
def test_a_bad_request_is_refused_saying_what_to_send(model, model_input, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message):
        model.predict(model_input, params=params)


def test_the_command_logs_any_checkpoint_into_its_run_and_registers_a_new_version(trained, capsys):
    from mlflow import MlflowClient

    from evaluation.pyfunc_model import main

    assert main([str(trained.run_dir), "--registered-model-name", NAME]) == 0
    assert f"registered as {NAME} version 2" in capsys.readouterr().out
    client = MlflowClient(trained.uri)
    assert [o.step for o in client.get_run(trained.run_id).outputs.model_outputs] == [2, 2]
    assert client.get_model_version(NAME, "2").run_id == trained.run_id


def test_a_failure_to_log_the_model_is_a_warning_not_an_error(tmp_path, capsys):
    from pipeline.tracking.logged_model import log_training_model

    log_training_model(tmp_path / "step-00000009", SimpleNamespace(registered_model_name=""), "0" * 32,
                       f"sqlite:///{tmp_path / 'mlflow.db'}")
    err = capsys.readouterr().err
    assert f"warning: the EMA model of {tmp_path / 'step-00000009'} was not logged to MLflow" in err
    log_training_model(tmp_path, SimpleNamespace(registered_model_name=""), None, None)
    assert "the training has no MLflow run" in capsys.readouterr().err


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_returns_the_images_over_http(trained, model, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**h.env(), "MLFLOW_TRACKING_URI": trained.uri, "MLFLOW_REGISTRY_URI": trained.uri,
           # mlflow models serve runs `uvicorn` by name: the environment's bin folder must be on PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/ping",
                                                                      timeout=2) as resp:
                if resp.status == 200:
                    break
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer on /ping within 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = _post(url, {"dataframe_split": {"columns": ["seed"], "data": [[0], [1], [7]]},
                                   "params": {"steps": 3}})
        assert status == 200, body
        served = np.array(body["predictions"])
        assert served.shape == (3, 1, 8, 8)
        assert np.array_equal(served, model.predict(pd.DataFrame({"seed": [0, 1, 7]}), params={"steps": 3}))
        status, body = _post(url, {"dataframe_split": {"columns": ["seed"], "data": [[0]]},
                                   "params": {"sampler": "euler"}})
        assert status == 400 and "sampler='euler'" in body.get("message", ""), body
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # uvicorn's worker, if it outlived the parent
            os.killpg(proc.pid, signal.SIGKILL)
