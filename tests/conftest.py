"""Fixtures shared by several test modules (module-specific helpers live in tests/helpers/)."""

import os
from pathlib import Path

# Under pytest-xdist (make test: two workers on two cores) every worker runs torch with one intra-op thread, and so
# does every process it starts with this environment. With torch's default (a thread per core), a worker's
# OpenMP threads spin while the other worker's processes hold the cores: in-process tests ran ~10x slower
# (test_sampling.py + test_diffusion.py: 216 s in the suite against 20-25 s alone, measured on a 2-core host).
TWO_WORKERS = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if TWO_WORKERS:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if TWO_WORKERS:
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, oversubscribed threads make tiny ops 100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store; copying it saves each test MLflow's table creation (~3 s)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it. mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, so an
    in-process test would otherwise point every later subprocess of its worker (a training, the demo) at its store."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
