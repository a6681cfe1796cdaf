"""The tracking interface and its MLflow transport (pipeline/tracking/sink.py, pipeline/tracking/mlflow_sink.py) against
real MLflow stores: the embedded sqlite store and a real `mlflow server`; the image helpers (pipeline/tracking/images.py).

The outage tests stop a real server mid-run (and start it again) and time every training-side call.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking.factory import make_sink
from pipeline.tracking.images import image_grid, to_hwc_uint8
from pipeline.tracking.mlflow_sink import MLflowSink
from pipeline.tracking.sink import NullSink, resolve_tracking_uri
from tests.helpers.mlflow_server import free_port, mlflow_server

CALL_BOUND_S = 0.5  # a training-side call returns within this whatever the store does (a network wait is >= 1 s)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def _cfg(**kw) -> TrackingConfig:
    base = dict(experiment="test", retries=2, retry_wait_s=0.05, timeout_s=2.0, start_timeout_s=20.0,
                flush_timeout_s=20.0, probe_interval_s=0.5)
    base.update(kw)
    return TrackingConfig(**base)


def _out_dir_with_store(tmp_path: Path, template: Path) -> Path:
    """``tmp_path/run``, with the default store beside it (``tmp_path/mlflow.db``: one store per parent)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copyfile(template, tmp_path / "mlflow.db")
    return out


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- no server -------------------------------------------------------------------------------------


def test_embedded_sqlite_default_logs_params_metrics_and_config(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    out = tmp_path / "run"
    sink = make_sink(_cfg(), out_dir=out, is_main_process=True, run_name="demo")
    assert sink.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # the parent's store
    assert sink.run_id is not None
    params = {f"p{i:03d}": i for i in range(250)}  # > 100: several batches
    params["long"] = "x" * 7000
    sink.log_params(params)
    for step in range(0, 50, 10):
        sink.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-5}, step=step)
    sink.log_metrics({"train/grad_norm": 2.0, "bad key!": 1.0, "train/odd": "abc"}, step=60)  # 1 of 3 valid
    sink.log_artifact(text="train:\n  lr: 0.0002\n", name="config.yaml")
    sink.finish("FINISHED")

    client = MlflowClient(sink.tracking_uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo"
    assert run.data.params["p249"] == "249" and len(run.data.params) == 251
    assert run.data.params["long"] == "x" * 6000  # truncated to MLflow's limit
    assert run.data.tags["out_dir"] == str(out.resolve())
    assert _history(client, sink.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(0, 50, 10)]
    assert _history(client, sink.run_id, "train/lr") == [(s, s * 1e-5) for s in range(0, 50, 10)]
    assert _history(client, sink.run_id, "train/grad_norm") == [(60, 2.0)]  # bad neighbours dropped alone
    assert set(run.data.metrics) == {"train/loss", "train/lr", "train/grad_norm"}
    assert any("'bad key!'" in r.getMessage() for r in caplog.records)
    # artifacts beside the store, not in the working directory
    config_files = list((tmp_path / "mlartifacts").rglob("config.yaml"))
    assert len(config_files) == 1 and config_files[0].read_text() == "train:\n  lr: 0.0002\n"
    assert sink.dropped == 0 and sink.stats.get("dropped_ops", 0) == 0


def test_resume_continues_run_and_keeps_changed_params_as_tags(tmp_path, caplog, empty_store):
    out = _out_dir_with_store(tmp_path, empty_store)
    first = make_sink(_cfg(), out_dir=out, is_main_process=True)
    first.log_params({"optimizer.lr": 2e-4, "world_size": 2})
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finish("KILLED")
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    second = make_sink(_cfg(), out_dir=out, is_main_process=True, run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"optimizer.lr": 2e-4, "world_size": 4})  # same lr: skipped; world_size changed
    assert second.flush(10.0)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in range(3, 6):
        second.log_metrics({"train/loss": float(step)}, step=step)
    second.finish("FINISHED")

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optimizer.lr": "0.0002", "world_size": "2"}
    assert run.data.tags["param_changed.world_size"] == "4"
    assert _history(client, first.run_id, "train/loss") == [(s, float(s)) for s in range(6)]
    assert any("world_size: '2' -> '4'" in r.getMessage() for r in caplog.records)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_attach_logs_into_a_running_run_without_touching_its_status(tmp_path, empty_store):
    out = _out_dir_with_store(tmp_path, empty_store)
    train = make_sink(_cfg(), out_dir=out, is_main_process=True)
    train.log_metrics({"train/loss": 0.5}, step=100)
    assert train.flush(10.0)
    evaluator = make_sink(_cfg(uri=train.tracking_uri), out_dir=tmp_path / "eval", is_main_process=True,
                          run_id=train.run_id, attach=True)
    evaluator.log_metrics({"eval/fid_digits": 12.5}, step=100)
    evaluator.set_tags({"fid_protocol.digits.num_samples": 1000})
    evaluator.finish()
    client = MlflowClient(train.tracking_uri)
    run = client.get_run(train.run_id)
    assert run.info.status == "RUNNING"  # the training is still going
    assert run.data.tags["fid_protocol.digits.num_samples"] == "1000"
    assert _history(client, train.run_id, "eval/fid_digits") == [(100, 12.5)]
    train.finish("FINISHED")
    assert client.get_run(train.run_id).info.status == "FINISHED"
    assert not (tmp_path / "eval").exists()  # the evaluator wrote into the training's store only


def test_resume_of_unknown_run_starts_a_new_one(tmp_path, caplog, empty_store):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    out = _out_dir_with_store(tmp_path, empty_store)
    sink = make_sink(_cfg(), out_dir=out, is_main_process=True, run_id="0" * 32)
    sink.log_metrics({"train/loss": 1.5}, step=7)
    sink.finish()
    assert sink.run_id not in (None, "0" * 32)
    client = MlflowClient(sink.tracking_uri)
    assert _history(client, sink.run_id, "train/loss") == [(7, 1.5)]
    assert any("starting a new run" in r.getMessage() for r in caplog.records)


def test_null_sink_on_other_ranks_and_when_disabled(tmp_path):
    for sink in (make_sink(_cfg(), out_dir=tmp_path / "a", is_main_process=False),
                 make_sink(_cfg(enabled=False), out_dir=tmp_path / "b", is_main_process=True)):
        assert type(sink) is NullSink and sink.run_id is None and sink.tracking_uri is None
        sink.log_params({"a": 1})
        sink.log_metrics({"train/loss": 1.0}, step=0)
        sink.log_image(np.zeros((4, 4, 3), np.uint8), key="k", step=0)
        sink.finish()
        assert sink.dropped == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_uri_resolution_and_bad_uris(tmp_path, monkeypatch):
    assert resolve_tracking_uri(_cfg(), tmp_path / "runs" / "a") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert resolve_tracking_uri(_cfg(uri="http://h:1"), tmp_path) == "http://h:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_tracking_uri(_cfg(), tmp_path) == "http://env:2"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        make_sink(_cfg(), out_dir=tmp_path, is_main_process=True)
    with pytest.raises(ConfigError, match=r"tracking.uri='runs/x' has no scheme"):
        TrackingConfig(uri="runs/x")
    with pytest.raises(ConfigError, match="tracking.queue_size"):
        TrackingConfig(queue_size=0)


def test_image_grid_layout_matches_an_independent_tiling():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 3, 6, 7), dtype=np.uint8)
    grid = image_grid(imgs, padding=2)
    # ceil(sqrt(5)) = 3 per row, 2 rows; torchvision puts `padding` before each tile and once at the end
    assert grid.shape == (2 * (6 + 2) + 2, 3 * (7 + 2) + 2, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + r * 8, 2 + c * 9
        assert np.array_equal(grid[y : y + 6, x : x + 7], imgs[i].transpose(1, 2, 0))
    assert grid[:2].max() == 0 and grid[8 + 2 :, 2 * 9 + 2 :].max() == 0  # padding and the empty 6th slot
    grey = image_grid(imgs[:, :1])
    assert np.array_equal(grey[..., 0], grey[..., 2])  # grey tiled as RGB
    assert np.array_equal(to_hwc_uint8(imgs[0]), imgs[0].transpose(1, 2, 0))
    assert to_hwc_uint8(imgs[0, :1]).shape == (6, 7)


# ---- outages without a server ---------------------------------------------------------------------


def _timed_calls(sink, n: int, start_step: int = 0) -> float:
    """Log n metric calls (2 values each); return the slowest call's duration."""
    worst = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        sink.log_metrics({"train/loss": 0.5, "train/lr": 1e-4}, step=start_step + i)
        worst = max(worst, time.perf_counter() - t0)
    return worst


def test_unreachable_uri_at_start_never_raises_and_counts_drops(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    sink = make_sink(_cfg(uri=uri, start_timeout_s=5.0, flush_timeout_s=3.0), out_dir=tmp_path,
                     is_main_process=True)
    assert time.perf_counter() - t0 < 5.0 + 2.5  # mlflow import + bounded wait
    assert isinstance(sink, MLflowSink) and sink.run_id is None
    worst = _timed_calls(sink, 100)
    sink.log_params({"a": 1})
    sink.log_image(np.zeros((8, 8, 3), np.uint8), key="samples/ema", step=1)
    t0 = time.perf_counter()
    sink.finish("FINISHED")
    assert time.perf_counter() - t0 < 3.0 + 0.5
    assert worst < CALL_BOUND_S
    assert sink.dropped == 200  # every metric value, counted
    assert any("Training goes on" in r.getMessage() for r in caplog.records)


def test_hung_server_fills_the_queue_without_blocking(tmp_path, caplog):
    """A server that accepts connections but never answers: requests wait for the HTTP timeout."""
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        cfg = _cfg(uri=uri, retries=1, timeout_s=1.0, queue_size=4, start_timeout_s=0.0, flush_timeout_s=1.5)
        sink = make_sink(cfg, out_dir=tmp_path, is_main_process=True)
        worst = _timed_calls(sink, 50)
        t0 = time.perf_counter()
        sink.finish()
        finish_s = time.perf_counter() - t0
        sink._thread.join(timeout=5.0)  # the request in flight when finish gave up ends by its timeout
    assert not sink._thread.is_alive()
    assert worst < CALL_BOUND_S
    assert finish_s < 1.5 + 0.5
    assert sink.dropped == 100 and sink.stats["queue_full"] >= 40
    assert any("tracking queue full" in r.getMessage() for r in caplog.records)


# ---- a real mlflow server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.mark.slow
def test_server_receives_params_metrics_image_and_resume(server, tmp_path):
    cfg = _cfg(uri=server.uri)
    sink = make_sink(cfg, out_dir=tmp_path, is_main_process=True, run_name="srv")
    sink.log_params({"optimizer.lr": 2e-4, "model.channel_mult": "[1, 2]"})
    for step in (0, 10, 20):
        sink.log_metrics({"train/loss": 1.0 + step, "train/images_per_s": 100.0 * step}, step=step)
    grid = image_grid(np.arange(4 * 3 * 4 * 4, dtype=np.uint8).reshape(4, 3, 4, 4))
    sink.log_image(grid, key="samples/ema", step=20)
    sink.log_artifact(text="a: 1\n", name="config.yaml")
    sink.finish("KILLED")
    assert sink.dropped == 0

    client = MlflowClient(server.uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "KILLED"
    assert run.data.params == {"optimizer.lr": "0.0002", "model.channel_mult": "[1, 2]"}
    assert _history(client, sink.run_id, "train/loss") == [(0, 1.0), (10, 11.0), (20, 21.0)]
    pngs = [a.path for a in client.list_artifacts(sink.run_id, "images") if a.path.endswith(".png")]
    assert len(pngs) == 1 and "samples~ema+step+20+" in pngs[0]
    local = client.download_artifacts(sink.run_id, pngs[0], str(tmp_path))
    assert np.array_equal(np.asarray(Image.open(local)), grid)  # lossless round trip over HTTP
    text = client.download_artifacts(sink.run_id, "config.yaml", str(tmp_path))
    assert Path(text).read_text() == "a: 1\n"

    resumed = make_sink(cfg, out_dir=tmp_path, is_main_process=True, run_id=sink.run_id)
    resumed.log_params({"optimizer.lr": 2e-4})  # already there, same value: no error
    resumed.log_metrics({"train/loss": 31.0}, step=30)
    resumed.finish("FINISHED")
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and resumed.dropped == 0
    assert _history(client, sink.run_id, "train/loss") == [(0, 1.0), (10, 11.0), (20, 21.0), (30, 31.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_server_stopped_mid_run_then_back(tmp_path, caplog):
    """Stop the server mid-logging: calls stay fast, drops are counted; restart it: logging resumes."""
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    root = tmp_path / "server"
    with mlflow_server(root) as srv:
        cfg = _cfg(uri=srv.uri, flush_timeout_s=5.0, probe_interval_s=0.5)
        sink = make_sink(cfg, out_dir=tmp_path, is_main_process=True)
        assert _timed_calls(sink, 5) < CALL_BOUND_S
        assert sink.flush(10.0) and sink.dropped == 0
        srv.stop()

    worst = _timed_calls(sink, 100, start_step=100)  # server gone
    assert sink.flush(10.0)
    assert worst < CALL_BOUND_S
    assert sink.dropped == 200  # every value logged while it was down
    assert any("Training goes on" in r.getMessage() for r in caplog.records)

    with mlflow_server(root, port=srv.port) as srv2:  # same store, same port: the server is back
        time.sleep(cfg.probe_interval_s)
        for i in range(20):  # the first call after the probe interval probes; the rest are sent
            sink.log_metrics({"train/loss": 7.0}, step=1000 + i)
            time.sleep(0.05)
        t0 = time.perf_counter()
        sink.finish("FINISHED")
        assert time.perf_counter() - t0 < cfg.flush_timeout_s + 0.5
        client = MlflowClient(srv2.uri)
        run = client.get_run(sink.run_id)
        steps = [s for s, _ in _history(client, sink.run_id, "train/loss")]
    assert steps[:5] == [0, 1, 2, 3, 4] and not any(100 <= s < 200 for s in steps)
    assert steps[-1] == 1019 and len(steps) >= 5 + 15  # recovered within a few calls
    assert run.info.status == "FINISHED"
    assert any("answers again" in r.getMessage() for r in caplog.records)

