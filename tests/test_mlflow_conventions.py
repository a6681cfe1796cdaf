"""MLflow conventions of the tracking sink, against real sqlite stores and real trainings: one store per project
(shared by concurrent processes), the experiment kind, MLflow's source tags, the data as a dataset input, and
MLflow's system metrics (pipeline/tracking/sink.py, pipeline/tracking/mlflow_sink.py, docs/tracking.md)."""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import DataConfig, TrackingConfig
from pipeline.tracking.factory import make_sink
from pipeline.tracking.mlflow_sink import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, _sqlite_locked, _transient
from pipeline.tracking.sink import describe_training_data, source_tags
from tests.helpers import trainer as h

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def _cfg(**kw) -> TrackingConfig:
    base = dict(experiment="conv", retries=2, retry_wait_s=0.05, start_timeout_s=30.0, flush_timeout_s=60.0)
    base.update(kw)
    return TrackingConfig(**base)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return h.prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def _project(tmp_path: Path, template: Path) -> Path:
    """``tmp_path/runs`` holding the project's store, as trainings with out_dir runs/NAME use it."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copyfile(template, runs / "mlflow.db")
    return runs


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the experiment kind ------------------------------------------------------------------------------


def test_experiments_get_the_classic_runs_view_unless_a_kind_was_chosen(tmp_path, empty_store):
    runs = _project(tmp_path, empty_store)
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("untagged")  # made by someone else, without a kind
    client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for experiment in ("new", "untagged", "genai"):
        sink = make_sink(_cfg(experiment=experiment), out_dir=runs / experiment, is_main_process=True)
        sink.finish()
        assert sink.run_id is not None and sink.tracking_uri == uri
    kinds = {e: client.get_experiment_by_name(e).tags.get(EXPERIMENT_KIND_TAG) for e in ("new", "untagged", "genai")}
    assert kinds == {"new": EXPERIMENT_KIND, "untagged": EXPERIMENT_KIND, "genai": "genai_development"}
    assert EXPERIMENT_KIND == "custom_model_development"


def test_source_tags_name_the_entry_point_the_job_kind_the_user_and_the_commit(monkeypatch, tmp_path):
    tags = source_tags("c0ffee", entry_point=str(REPO / "launch" / "train.py"))
    assert tags == {"mlflow.source.name": "launch/train.py", "mlflow.source.type": "LOCAL",
                    "mlflow.user": getpass.getuser(), "mlflow.source.git.commit": "c0ffee"}
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    outside = source_tags("", entry_point=str(tmp_path / "mine.py"))
    assert outside["mlflow.source.type"] == "JOB" and outside["mlflow.source.name"] == str(tmp_path / "mine.py")
    assert "mlflow.source.git.commit" not in outside  # not a git checkout: no commit tag at all
    assert source_tags(entry_point="-c")["mlflow.source.name"] == "<console>"


def test_a_resumed_run_gets_the_current_tags_and_its_experiment_the_kind(tmp_path, empty_store, caplog):
    """A run (and experiment) made before these conventions, continued by a job at another commit."""
    runs = _project(tmp_path, empty_store)
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    old = client.create_run(client.create_experiment("conv"), tags={"mlflow.source.git.commit": "aaa"})
    client.set_terminated(old.info.run_id, status="KILLED")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.mlflow_sink")
    sink = make_sink(_cfg(), out_dir=runs / "a", is_main_process=True, run_id=old.info.run_id,
                     tags={"mlflow.source.git.commit": "bbb", "mlflow.source.type": "LOCAL"})
    sink.finish()
    run = client.get_run(old.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.git.commit"] == "bbb" and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert any("started at commit aaa and is continued at bbb" in r.getMessage() for r in caplog.records)


# ---- the dataset input --------------------------------------------------------------------------------


def _only_input(client: MlflowClient, run_id: str):
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    return dataset_input.dataset, {t.key: t.value for t in dataset_input.tags}


def test_prepared_folder_is_a_dataset_input_whose_digest_is_the_manifest_sha256(tmp_path, empty_store, digits):
    runs = _project(tmp_path, empty_store)
    info = describe_training_data(DataConfig(shards=str(digits)))
    sink = make_sink(_cfg(), out_dir=runs / "a", is_main_process=True)
    sink.log_dataset(info)
    sink.finish()
    client = MlflowClient(sink.tracking_uri)
    dataset, tags = _only_input(client, sink.run_id)
    full = _sha256((digits / "manifest.json").read_bytes())
    assert dataset.digest == full[:36] and len(dataset.digest) == 36  # MLflow's longest digest
    assert dataset.name == "digits" and dataset.source_type == "local"
    assert json.loads(dataset.source) == {"uri": str(digits.resolve())}
    profile = json.loads(dataset.profile)
    manifest = json.loads((digits / "manifest.json").read_text())
    assert profile["sha256"] == full and profile["split"] == "train"
    assert profile["num_samples"] == manifest["splits"]["train"]["num_samples"] == 1797
    assert profile["num_shards"] == len(manifest["splits"]["train"]["shards"])
    features = json.loads(json.loads(dataset.schema)["mlflow_tensorspec"]["features"])
    assert features[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 8, 8, 1]}
    assert tags == {"mlflow.data.context": "training"}

    # a resumed job logs the same data again: still one input; a second training shares the dataset record
    again = make_sink(_cfg(), out_dir=runs / "a", is_main_process=True, run_id=sink.run_id)
    again.log_dataset(info)
    again.finish()
    other = make_sink(_cfg(), out_dir=runs / "b", is_main_process=True)
    other.log_dataset(describe_training_data(DataConfig(shards=str(digits / "manifest.json"))))
    other.finish()
    assert _only_input(client, sink.run_id)[0] == dataset
    assert _only_input(client, other.run_id)[0].digest == dataset.digest
    assert again.dropped == 0 and other.stats.get("dropped_ops", 0) == 0


def test_shards_without_a_manifest_are_identified_by_their_sorted_list(tmp_path, empty_store, digits):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in sorted(digits.glob("train-*.tar"))[:3]:
        shutil.copyfile(tar, bare / tar.name)
    pattern = f"{bare}/train-{{000000..000002}}.tar"
    info = describe_training_data(DataConfig(shards=pattern))
    expected = "\n".join(sorted(str(bare / f"train-{i:06d}.tar") for i in range(3)))
    assert info.sha256 == _sha256(expected.encode())
    assert info.name == "bare" and info.source == pattern
    assert info.profile == {"split": None, "num_samples": -1, "num_shards": 3, "digest_of": "shard list",
                            "sha256": info.sha256}  # counts unknown: the shards are not opened for this
    runs = _project(tmp_path, empty_store)
    sink = make_sink(_cfg(), out_dir=runs / "a", is_main_process=True)
    sink.log_dataset(info)
    sink.finish()
    dataset, _ = _only_input(MlflowClient(sink.tracking_uri), sink.run_id)
    assert dataset.digest == info.sha256[:36] and json.loads(dataset.source) == {"uri": pattern}
    assert dataset.schema is None  # no manifest: no geometry to state


# ---- one store, several processes ---------------------------------------------------------------------


def test_mlflow_raises_a_locked_sqlite_store_as_a_transient_error(tmp_path):
    """The exception MLflow's own session wrapper makes of SQLite's "database is locked" (its 20 s busy
    timeout, set per session, is lowered inside the session so that the lock shows at once)."""
    import sqlalchemy
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
    from mlflow.store.db.utils import _get_managed_session_maker

    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")  # another process writing
    managed = _get_managed_session_maker(sqlalchemy.orm.sessionmaker(bind=sqlalchemy.create_engine(f"sqlite:///{db}")),
                                         "sqlite")
    with pytest.raises(MlflowException) as caught, managed(read_only=False) as session:
        session.execute(sqlalchemy.text("PRAGMA busy_timeout = 0"))
        session.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    holder.execute("ROLLBACK")
    exc = caught.value
    assert exc.error_code == "TEMPORARILY_UNAVAILABLE" and "database is locked" in str(exc)
    assert _sqlite_locked(exc) and _transient(exc)
    rejected = MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)  # a 404: not retried
    assert not _sqlite_locked(rejected) and not _transient(rejected)


CHILD = """
import json, sys, time
from pipeline.config import TrackingConfig
from pipeline.tracking.factory import make_sink
parent, name, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
cfg = TrackingConfig(experiment="shared", retries=1, retry_wait_s=0.05, start_timeout_s=120, flush_timeout_s=240)
time.sleep(max(0.0, start - time.time()))  # all children open the (fresh) store at the same moment
sink = make_sink(cfg, out_dir=f"{parent}/{name}", is_main_process=True, run_name=name)
for i in range(n):
    sink.log_metrics({"train/loss": float(i), "train/lr": i * 1e-4}, step=i)
    sink.set_tags({"last_step": i})  # a tag between metric calls: no coalescing, one transaction per call
sink.finish("FINISHED")
print(json.dumps({"run_id": sink.run_id, "dropped_ops": sink.stats.get("dropped_ops", 0)}))
"""


@pytest.mark.slow
def test_processes_opening_and_writing_one_fresh_sqlite_store_at_once_lose_nothing(tmp_path):
    """Three sinks in three processes create the same new store at the same instant (MLflow's table creation
    is not safe against that: the sink serialises it under <db>.lock) and write into it concurrently."""
    parent, n, names = tmp_path / "runs", 100, ("a", "b", "c")
    start = time.time() + 8  # after the imports of all three
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(parent), name, str(n), str(start)], cwd=REPO,
                              env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["dropped_ops"] for r in results] == [0, 0, 0]
    client = MlflowClient(f"sqlite:///{parent / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert sorted(r.info.run_name for r in found) == list(names)
    for r in results:
        run = client.get_run(r["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["last_step"] == str(n - 1)
        for key in ("train/loss", "train/lr"):
            assert sorted(m.step for m in client.get_metric_history(r["run_id"], key)) == list(range(n))


@pytest.mark.slow
def test_a_store_locked_past_mlflows_busy_timeout_is_waited_out_not_dropped(tmp_path, empty_store):
    """Another process holds the store's write lock for 23 s: MLflow gives up after its 20 s busy timeout with
    "database is locked"; the sink (one attempt per call, no retries) waits the lock out and loses nothing."""
    runs = _project(tmp_path, empty_store)
    sink = make_sink(_cfg(retries=1), out_dir=runs / "a", is_main_process=True)
    sink.log_metrics({"train/loss": 1.0}, step=0)
    assert sink.flush(30.0)
    client = MlflowClient(sink.tracking_uri)
    holder = sqlite3.connect(runs / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    direct: list[BaseException] = []

    def _direct_write() -> None:
        try:
            client.set_tag(sink.run_id, "k", "v")
        except Exception as exc:
            direct.append(exc)

    writer = threading.Thread(target=_direct_write)
    writer.start()
    t0 = time.perf_counter()
    for step in range(1, 11):
        sink.log_metrics({"train/loss": float(step)}, step=step)
    worst = time.perf_counter() - t0
    time.sleep(23.0)
    holder.execute("ROLLBACK")
    writer.join(timeout=30)
    sink.finish("FINISHED")
    assert worst < 0.5  # the training side never waited on the lock
    (exc,) = direct  # what MLflow raised to a plain client meanwhile
    assert isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE" and _sqlite_locked(exc)
    assert sorted(m.step for m in client.get_metric_history(sink.run_id, "train/loss")) == list(range(11))
    assert client.get_run(sink.run_id).info.status == "FINISHED"
    assert sink.dropped == 0 and sink.stats["lock_waits"] >= 1 and not sink.stats.get("failed_attempts")


# ---- real trainings -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_trainings_at_once_share_the_project_store_with_source_tags_data_and_system_metrics(digits, tmp_path):
    from evaluation.compare import load_runs

    parent = tmp_path / "runs"
    base = [f"data.shards={digits}", "tracking.enabled=true", "tracking.experiment=t", "train.total_steps=4",
            "logging.every_steps=2", "checkpoint.every_steps=4"]
    a = h.start(h.train_cmd([*base, "name=a", f"train.out_dir={parent}/a", "tracking.system_metrics=true"],
                            script=h.LAUNCH),  # the entry point whose mlflow.source.name is checked
                h.env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2", SLURM_JOB_ID=""), tmp_path / "a.log")
    b = h.start(h.train_cmd([*base, "name=b", f"train.out_dir={parent}/b"], script=h.LAUNCH),
                h.env(SLURM_JOB_ID="4242"), tmp_path / "b.log")
    assert a.wait(300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert b.wait(300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert not (parent / "a" / "mlflow.db").exists() and not (parent / "b" / "mlflow.db").exists()

    uri = f"sqlite:///{parent / 'mlflow.db'}"
    summaries = load_runs(uri, "t", 10)  # what evaluation.compare reads: both trainings, one store
    assert summaries is not None and sorted(s.name for s in summaries) == ["a", "b"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    run = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    for name in ("a", "b"):
        meta = json.loads((parent / name / "step-00000004" / "meta.json").read_text())
        assert meta["mlflow_run_id"] == run[name].info.run_id and meta["mlflow_tracking_uri"] == uri

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    for name, kind in (("a", "LOCAL"), ("b", "JOB")):
        tags, params = run[name].data.tags, run[name].data.params
        assert tags["mlflow.source.name"] == "launch/train.py" and tags["mlflow.source.type"] == kind
        assert tags["mlflow.user"] == getpass.getuser() == run[name].info.user_id
        if commit.returncode == 0:
            assert tags["mlflow.source.git.commit"] == commit.stdout.strip()
        else:
            assert "mlflow.source.git.commit" not in tags
        assert "git_commit" not in params and params["world_size"] == "1"
        dataset, input_tags = _only_input(client, run[name].info.run_id)
        assert dataset.digest == _sha256((digits / "manifest.json").read_bytes())[:36]
        assert json.loads(dataset.source) == {"uri": str(digits.resolve())} and dataset.name == digits.name
        assert input_tags == {"mlflow.data.context": "training"}
    assert run["b"].data.params["slurm_job_id"] == "4242"

    system_a = [k for k in run["a"].data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system_a and "system/system_memory_usage_megabytes" in system_a
    assert not [k for k in run["b"].data.metrics if k.startswith("system/")]  # off by default
    assert sorted(m.step for m in client.get_metric_history(run["a"].info.run_id, "train/loss")) == [2, 4]
