"""A shared MLflow tracking server with authentication, as docs/tracking.md sets it up: MLflow's basic-auth app on
127.0.0.1, a user created through its REST API, a training that logs with MLFLOW_TRACKING_USERNAME/PASSWORD. The
run and its metrics are there; the password is in no file, log, parameter or tag; a request without (or with
wrong) credentials is refused with 401."""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient

from tests.helpers import trainer as h
from tests.helpers.mlflow_server import mlflow_server


def _status(uri: str, credentials: str = "") -> int:
    """HTTP status of an experiment search, with basic-auth `user:password` credentials or none."""
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}',
                                 headers={"Content-Type": "application/json"})
    if credentials:
        req.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_training_logs_to_a_basic_auth_server_and_its_password_stays_out_of_every_file(tmp_path, monkeypatch):
    admin_password, password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    digits = h.prepare_digits(tmp_path / "digits")
    out = tmp_path / "run"
    (tmp_path / "tmp").mkdir()
    with mlflow_server(tmp_path / "server", admin_password=admin_password, start_timeout_s=180) as server:
        assert _status(server.uri) == 401
        assert _status(server.uri, f"admin:{admin_password}") == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the admin creates the training's user
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        AuthServiceClient(server.uri).create_user("trainer", password)

        r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={out}", "tracking.enabled=true",
                               f"tracking.uri={server.uri}", "tracking.experiment=shared", "train.total_steps=4",
                               "tracking.start_timeout_s=60", "tracking.flush_timeout_s=120"]),
                  h.env(MLFLOW_TRACKING_USERNAME="trainer", MLFLOW_TRACKING_PASSWORD=password,
                        TMPDIR=str(tmp_path / "tmp")))
        assert r.returncode == 0, r.stderr[-3000:]
        assert _status(server.uri, f"trainer:{password}") == 200
        assert _status(server.uri, "trainer:not-the-password") == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(server.uri)
        [run] = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["train.total_steps"] == "4"
        assert run.info.run_id == json.loads((out / "mlflow_run.json").read_text())["run_id"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
        for secret in (password, admin_password):
            assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in k or secret in v]
        config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "downloaded"))
        assert password not in Path(config).read_text()

    logs = r.stdout + r.stderr + (tmp_path / "server" / "mlflow-server.log").read_text()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "basic_auth.db" for p in files) and any(p.parent == out for p in files)
    for secret in (password, admin_password):
        assert secret not in logs
        assert not [p for p in files if secret.encode() in p.read_bytes()]  # the run, the stores, the temp files
