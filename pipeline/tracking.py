"""The tracking interface: ``NullSink`` (the methods every sink has), ``make_sink`` and where runs are stored.

    sink = make_sink(cfg.tracking, out_dir=cfg.train.out_dir, is_main_process=acc.is_main_process,
                     run_id=meta.get("mlflow_run_id"), run_name=cfg.name)
    sink.log_metrics({"train/loss": 0.03}, step=100)
    sink.finish("FINISHED")

The main process gets the MLflow transport (pipeline/mlflow_sink.py: a bounded queue and a sender thread, so
that no call waits on the network or raises); every other process, and ``tracking.enabled=false``, gets a
``NullSink``. Names of metrics, params, tags and artifacts: docs/tracking.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.config import ConfigError, TrackingConfig

STATUSES = ("FINISHED", "KILLED", "FAILED")
RUN_FILE = "mlflow_run.json"  # beside the checkpoints: the training's run, written as soon as it exists


def read_run_file(out_dir: str | os.PathLike) -> dict[str, str] | None:
    """{"run_id", "tracking_uri"} of the training whose out_dir this is, or None (tracking off, or not yet)."""
    path = Path(out_dir) / RUN_FILE
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("run_id") and found.get("tracking_uri") else None


def write_run_file(out_dir: str | os.PathLike, run_id: str, tracking_uri: str) -> None:
    """Atomically (tmp + rename), so a reader never sees half a file."""
    path = Path(out_dir) / RUN_FILE
    tmp = path.with_name(f".tmp-{os.getpid()}-{RUN_FILE}")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    os.replace(tmp, path)


def resolve_tracking_uri(cfg: TrackingConfig, out_dir: str | os.PathLike) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///<abs out_dir>/mlflow.db``."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
    file_store = uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(
            f"tracking URI {uri!r} is an MLflow file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///ABS/PATH/mlflow.db (or set that variable)"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(unquote(urlparse(uri).path)) if uri.startswith("sqlite:///") else None


def sqlite_artifact_location(uri: str) -> str | None:
    """``<folder of the .db>/mlartifacts`` for a ``sqlite:///`` URI (artifacts beside the store), else None."""
    db = _sqlite_path(uri)
    return None if db is None else str(db.parent / "mlartifacts")


class NullSink:
    """The tracking interface; this one does nothing (non-main processes, ``tracking.enabled=false``)."""

    run_id: str | None = None
    tracking_uri: str | None = None

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
        """A uint8 HWC or CHW image (e.g. ``pipeline.images.image_grid(samples)``) as a step-indexed image."""

    def log_artifact(self, path: str | os.PathLike | None = None, *, text: str | None = None,
                     name: str | None = None, artifact_path: str | None = None) -> None:
        """A file (read when sent: keep it until finish) or ``text`` saved as artifact ``name``."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Run tags (mutable, last value wins)."""

    def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` until every call made so far has been sent or dropped."""
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Flush within the time bound and close the run with one of ``STATUSES``."""


def make_sink(cfg: TrackingConfig, *, out_dir: str | os.PathLike, is_main_process: bool,
              run_id: str | None = None, run_name: str | None = None, attach: bool = False,
              tags: dict[str, Any] | None = None, supersedes: str | None = None) -> NullSink:
    """The sink for this process: MLflow on the main process when enabled, else a NullSink.

    ``run_id``: continue that run (resume; from the checkpoint) instead of creating one. ``attach``:
    log into ``run_id`` without changing its status (the evaluation job). A training sink (not ``attach``)
    records its run in ``out_dir/mlflow_run.json`` as soon as the run exists, so that a checkpoint saved
    before that moment can still be matched to it; ``supersedes``: a run of the same out_dir that a dead job
    left RUNNING and that this one does not continue: it is marked KILLED. Waits at most
    ``cfg.start_timeout_s`` for the run to exist, so that ``sink.run_id`` is usually set on return.
    Raises ConfigError only for a URI that can never work (a file store MLflow refuses).
    """
    if not cfg.enabled or not is_main_process:
        return NullSink()
    if attach and not run_id:
        raise ValueError("make_sink(attach=True) needs the run_id of the run to log into")
    uri = resolve_tracking_uri(cfg, out_dir)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # here, not at the top: mlflow is imported only by a process that logs
    from pipeline.mlflow_sink import MLflowSink

    run_tags = {"out_dir": str(Path(out_dir).resolve())}
    run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    sink = MLflowSink(
        cfg, tracking_uri=uri, run_id=run_id, run_name=run_name or cfg.run_name or Path(out_dir).name,
        experiment=cfg.experiment, tags=run_tags, attach=attach, artifact_location=sqlite_artifact_location(uri),
        run_file_dir=None if attach else Path(out_dir), supersedes=supersedes,
    )
    if cfg.start_timeout_s > 0:
        sink.wait_ready(cfg.start_timeout_s)
    return sink
