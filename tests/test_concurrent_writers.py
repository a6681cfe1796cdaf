"""Four trainings writing one MLflow store at once, on a loaded CPU: four runs, each with all its metrics, its
own id in its checkpoints and its status FINISHED; against the embedded sqlite store and against a server.

Users run sweeps and concurrent jobs against one store. Under load, opening the store (MLflow's client on a
sqlite file: 6-17 s per process with 6 busy loops on 2 cores) outlasted ``tracking.start_timeout_s``, the
trainings went on, and a checkpoint written before the run existed recorded ``mlflow_run_id: null`` (3 runs
of 3 before the fix). Now a checkpoint waits for a run still being created (docs/tracking.md, "One run per
training"). The load generator keeps both cores busy, as a sweep on a shared host does.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import trainer as h
from tests.helpers.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow

TRAININGS = 4
STEPS = 6


@contextlib.contextmanager
def cpu_load(processes: int = 6) -> Iterator[None]:
    """``processes`` Python processes spinning on the CPU while the block runs."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in burners:
            p.kill()
        for p in burners:
            p.wait()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return h.prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def _train_at_once(digits: Path, parent: Path, extra: list[str]) -> list[str]:
    """TRAININGS trainings started together under CPU load; their logs."""
    base = [f"data.shards={digits}", "tracking.enabled=true", "tracking.experiment=t", f"train.total_steps={STEPS}",
            "logging.every_steps=2", f"checkpoint.every_steps={STEPS}", *extra]
    names = [f"w{i}" for i in range(TRAININGS)]
    with cpu_load():
        procs = [h.start(h.train_cmd([*base, f"name={n}", f"train.out_dir={parent / n}"], script=h.LAUNCH),
                         h.env(), parent.parent / f"{n}.log") for n in names]
        codes = [p.wait(600) for p in procs]
    logs = [(parent.parent / f"{n}.log").read_text() for n in names]
    for n, code, log in zip(names, codes, logs):
        assert code == 0, f"{n}:\n{log[-3000:]}"
    return logs


def _check_runs(uri: str, parent: Path, logs: list[str]) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == TRAININGS and sorted(by_name) == [f"w{i}" for i in range(TRAININGS)]
    for i, log in enumerate(logs):
        run = by_name[f"w{i}"]
        meta = json.loads((parent / f"w{i}" / f"step-{STEPS:08d}" / "meta.json").read_text())
        assert meta["mlflow_run_id"] == run.info.run_id, log[-2000:]
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(2, STEPS + 1, 2)), log[-2000:]
        assert "dropped" not in log, log[-2000:]  # nothing was lost to the contention
    assert len({r.info.run_id for r in runs}) == TRAININGS


def test_four_trainings_at_once_on_one_sqlite_store_under_load(digits, tmp_path):
    parent = tmp_path / "runs"
    logs = _train_at_once(digits, parent, [])
    _check_runs(f"sqlite:///{parent / 'mlflow.db'}", parent, logs)


def test_four_trainings_at_once_on_one_server_under_load(digits, tmp_path):
    parent = tmp_path / "runs"
    with mlflow_server(tmp_path / "server") as server:
        logs = _train_at_once(digits, parent, [f"tracking.uri={server.uri}"])
        _check_runs(server.uri, parent, logs)
