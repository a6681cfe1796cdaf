"""The tracking interface: ``NullSink`` (the methods every sink has), where runs are stored (the store URI, the
run file beside the checkpoints), the run's tags and its dataset input. ``make_sink`` (pipeline.tracking.factory)
gives a process its sink.

    sink = make_sink(cfg.tracking, out_dir=cfg.train.out_dir, is_main_process=acc.is_main_process,
                     run_id=meta.get("mlflow_run_id"), run_name=cfg.name)
    sink.log_metrics({"train/loss": 0.03}, step=100)
    sink.finish("FINISHED")

The main process gets the MLflow transport (pipeline/tracking/mlflow_sink.py: a bounded queue and a sender thread, so
that no call waits on the network or raises); every other process, and ``tracking.enabled=false``, gets a
``NullSink``. By default every training of a project shares one store, ``<parent of train.out_dir>/mlflow.db``,
so that ``evaluation.compare`` sees them side by side. Names of metrics, params, tags, the dataset input and
artifacts: docs/tracking.md.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import fsspec

from pipeline.config import ConfigError, DataConfig, TrackingConfig
from pipeline.data.manifest import MANIFEST_NAME, is_url, join, read_manifest
from pipeline.data.shards import resolve_shards
from pipeline.files import JSON_MAX_BYTES, read_json

REPO_ROOT = Path(__file__).resolve().parents[2]

STATUSES = ("FINISHED", "KILLED", "FAILED")
RUN_FILE = "mlflow_run.json"  # beside the checkpoints: the training's run, written as soon as it exists


def read_run_file(out_dir: str | os.PathLike) -> dict[str, str] | None:
    """{"run_id", "tracking_uri"} of the training whose out_dir this is, or None (tracking off, or not yet)."""
    path = Path(out_dir) / RUN_FILE
    try:
        found = read_json(path, max_bytes=JSON_MAX_BYTES, what="run file")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("run_id") and found.get("tracking_uri") else None


def write_run_file(out_dir: str | os.PathLike, run_id: str, tracking_uri: str) -> None:
    """Atomically (tmp + rename), so a reader never sees half a file."""
    path = Path(out_dir) / RUN_FILE
    tmp = path.with_name(f".tmp-{os.getpid()}-{RUN_FILE}")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    os.replace(tmp, path)


def default_store(out_dir: str | os.PathLike) -> Path:
    """``<abs parent of out_dir>/mlflow.db``: one store per project (runs/mlflow.db for runs/a and runs/b)."""
    return Path(out_dir).resolve().parent / "mlflow.db"


def resolve_tracking_uri(cfg: TrackingConfig, out_dir: str | os.PathLike) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///<abs parent of out_dir>/mlflow.db``."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{default_store(out_dir)}"
    file_store = uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(
            f"tracking URI {uri!r} is an MLflow file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///ABS/PATH/mlflow.db (or set that variable)"
        )
    return uri


UI_PORT = 5000  # where the printed `mlflow ui` command serves a sqlite store


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to look in the MLflow UI: the run's page (``run_id``) or the experiment's training runs, with the
    experiment id filled in, and, for a sqlite store, the ``mlflow ui`` command that serves it on 127.0.0.1.

    Never the experiment's home page: MLflow 3.17 opens it on its GenAI overview (traces, latency, tokens),
    empty for training runs, whatever the experiment's kind tag (the UI keeps that switch in the browser's
    localStorage); ``#/experiments/<id>/runs`` and a run's page show runs, metrics, datasets and sources."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page}"
    if sqlite_path(tracking_uri) is None:
        return f"MLflow UI: {page} of the UI serving {tracking_uri}"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    serve = (f"{shlex.quote(str(mlflow_cli))} ui --backend-store-uri {shlex.quote(tracking_uri)} "
             f"--host 127.0.0.1 --port {UI_PORT}")
    return f"MLflow UI: {serve}\n           then open http://127.0.0.1:{UI_PORT}/{page}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None: SQLAlchemy's reading, ``sqlite:////abs/x.db`` is
    ``/abs/x.db`` and ``sqlite:///rel/x.db`` is ``rel/x.db`` (a ``//abs`` path would make the artifact location
    a network path, ``//abs/...``, which MLflow's model loading parses as host ``abs``)."""
    return Path(unquote(urlparse(uri).path)[1:]) if uri.startswith("sqlite:///") else None


def sqlite_artifact_location(uri: str) -> str | None:
    """``<folder of the .db>/mlartifacts`` for a ``sqlite:///`` URI (artifacts beside the store), else None."""
    db = sqlite_path(uri)
    return None if db is None else str(db.parent / "mlartifacts")


def source_tags(git_commit: str = "", entry_point: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags for a training run (what ``mlflow.start_run`` would set, and the UI shows).

    ``mlflow.source.name``: the entry point (``sys.argv[0]``), relative to the repository when inside it;
    ``mlflow.source.type``: JOB under SLURM, else LOCAL; ``mlflow.user``; ``mlflow.source.git.commit`` when
    ``git_commit`` is known (a git checkout). The keys are MLflow's constants, imported here: only a process
    that logs calls this.
    """
    # mlflow: ~1.5-3 s of import, paid only by a process that talks to MLflow
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    main = entry_point if entry_point is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "")
    name = "<console>" if main in ("", "-c", "-") else main
    if name != "<console>":
        path = Path(name).resolve()
        name = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    kind = SourceType.JOB if os.environ.get("SLURM_JOB_ID") else SourceType.LOCAL
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):  # no login name (e.g. a container's uid without passwd entry)
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: SourceType.to_string(kind), MLFLOW_USER: user}
    if git_commit:
        tags[MLFLOW_GIT_COMMIT] = git_commit
    return tags


@dataclass(frozen=True)
class DatasetInfo:
    """The training data as an MLflow dataset input (built into ``mlflow.entities.Dataset`` by the sink).

    ``sha256``: of the prepared data's manifest.json, or, for shards without a manifest, of the sorted shard
    list (newline-joined). The dataset's MLflow digest is its first 36 characters (MLflow's limit); the full
    hash is also in the profile (``sha256``).
    """

    name: str  # the data folder's name (e.g. digits)
    sha256: str
    source: str  # where the shards are: the prepared folder, or data.shards as given (pattern, URLs)
    profile: dict[str, Any] = field(default_factory=dict)  # split, num_samples (-1 = unknown), num_shards, ...
    image_size: int = 0  # 0 = unknown (no manifest)
    channels: int = 0
    num_classes: int = 0  # 0 = unlabelled or unknown

    @property
    def source_type(self) -> str:
        """MLflow's dataset source types: local (a path or file: URL), http, or the URL scheme (s3, gs, pipe)."""
        if self.source.startswith("pipe:"):
            return "pipe"
        scheme = self.source.split("://", 1)[0] if "://" in self.source else "file"
        return {"file": "local", "https": "http"}.get(scheme, scheme)

    def source_json(self) -> str:
        """As MLflow's own sources serialise themselves: {"url": ...} for http, {"uri": ...} otherwise."""
        return json.dumps({"url" if self.source_type == "http" else "uri": self.source})


def describe_training_data(data: DataConfig) -> DatasetInfo:
    """``data.shards`` (resolved as the loader resolves it) as a dataset: name, digest, source, split and counts.

    Reads the manifest (a small JSON file) and nothing else: shards without a manifest are not opened, their
    sample count is -1 (unknown). Raises DataError/ManifestError/OSError like the loader would.
    """

    spec = data.shards.strip()
    shardset = resolve_shards(spec, data.split, need_counts=False)
    shards = shardset.shards
    # a pattern or URL list is read as given: data.split selects nothing there
    profile: dict[str, Any] = {"split": None, "num_samples": shardset.num_samples if shardset.counts_known
                               else -1, "num_shards": len(shards)}
    looks_like_tars = ".tar" in spec or "{" in spec or "::" in spec or spec.startswith("pipe:")
    if not looks_like_tars:  # a prepared folder or its manifest.json: the manifest is the data's identity
        path = spec if spec.endswith(".json") else join(spec, MANIFEST_NAME)
        manifest = read_manifest(path)
        digest = hashlib.sha256(_read_bytes(path)).hexdigest()
        source = manifest.location
        profile.update(split=data.split, digest_of="manifest.json", encoding=manifest.encoding)
    else:  # a pattern or URL list: the shards it names are the identity
        digest = hashlib.sha256("\n".join(sorted(s.url for s in shards)).encode()).hexdigest()
        source = spec if is_url(spec) or "::" in spec else os.path.abspath(spec)
        profile["digest_of"] = "shard list"
    profile["sha256"] = digest
    folder = source.rstrip("/").rsplit("/", 1)[-1] if not looks_like_tars else _folder_of(shards[0].url)
    return DatasetInfo(name=folder or "data", sha256=digest, source=source, profile=profile,
                       image_size=shardset.image_size, channels=shardset.channels, num_classes=shardset.num_classes)


def _folder_of(url: str) -> str:
    parent = url.rsplit("/", 1)[0] if "/" in url else os.getcwd()
    return parent.rstrip("/").rsplit("/", 1)[-1]


def _read_bytes(path: str) -> bytes:
    if is_url(path):
        with fsspec.open(path, "rb") as f:
            return f.read()
    return Path(path).read_bytes()


class NullSink:
    """The tracking interface; this one does nothing (non-main processes, ``tracking.enabled=false``)."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None  # the run's experiment, once the store has answered

    @property
    def dropped(self) -> int:
        """Metric values dropped (queue full or store unreachable)."""
        return 0

    @property
    def stats(self) -> dict[str, int]:
        return {}

    def log_params(self, params: dict[str, Any]) -> None:
        """Flat ``{key: value}``; values become strings truncated to MLflow's limit."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Scalar metrics at an optimizer step; values are converted with float() now."""

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A uint8 HWC or CHW image (e.g. ``pipeline.tracking.images.image_grid(samples)``) as a step-indexed image."""

    def log_artifact(self, path: str | os.PathLike | None = None, *, text: str | None = None,
                     name: str | None = None, artifact_path: str | None = None) -> None:
        """A file (read when sent: keep it until finish) or ``text`` saved as artifact ``name``."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Run tags (mutable, last value wins)."""

    def log_dataset(self, dataset: DatasetInfo, context: str = "training") -> None:
        """The data as an MLflow dataset input of the run (``mlflow.data.context`` = ``context``)."""

    def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` until every call made so far has been sent or dropped."""
        return True

    def settled_run_id(self, timeout_s: float) -> str | None:
        """The run id for a checkpoint: while the run is still being created (a slow store, not a failed one),
        wait at most ``timeout_s`` for it; None when tracking is off, the store failed, or it took longer."""
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        """Flush within the time bound and close the run with one of ``STATUSES``."""


SWEEP_ID_ENV, SWEEP_ELEMENT_ENV = "DDPM_SWEEP_ID", "DDPM_SWEEP_ELEMENT"


def sweep_tags() -> dict[str, str]:
    """``sweep`` and ``sweep.element`` of a training run started by launch/slurm/sweep.sbatch (which exports
    DDPM_SWEEP_ID and DDPM_SWEEP_ELEMENT), so ``evaluation.compare --tag sweep=ID`` selects the sweep's runs."""
    tags = {"sweep": os.environ.get(SWEEP_ID_ENV, ""), "sweep.element": os.environ.get(SWEEP_ELEMENT_ENV, "")}
    return {k: v for k, v in tags.items() if v} if tags["sweep"] else {}
