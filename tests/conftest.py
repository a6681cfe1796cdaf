"""Fixtures shared by several test modules (module-specific helpers live in tests/helpers/)."""

from pathlib import Path

import pytest
import torch


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
