"""``make_sink``: the sink a process logs through; the MLflow transport on the main process of a tracked run, a
``NullSink`` everywhere else.

    sink = make_sink(cfg.tracking, out_dir=cfg.train.out_dir, is_main_process=acc.is_main_process,
                     run_id=meta.get("mlflow_run_id"), run_name=cfg.name)
    sink.log_metrics({"train/loss": 0.03}, step=100)
    sink.finish("FINISHED")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.tracking.sink import (
    NullSink,
    resolve_tracking_uri,
    sqlite_artifact_location,
    sqlite_path,
    sweep_tags,
)


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
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # The one function-local import of our own code: the transport imports mlflow (~1.5 s of CPU per process on
    # 2 cores), which only the main process of a tracked run needs; every other rank and tracking.enabled=false
    # never import it.
    from pipeline.tracking.mlflow_sink import MLflowSink

    run_tags = {"out_dir": str(Path(out_dir).resolve())}
    if not attach:
        run_tags.update(sweep_tags())
    run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    sink = MLflowSink(
        cfg, tracking_uri=uri, run_id=run_id, run_name=run_name or cfg.run_name or Path(out_dir).name,
        experiment=cfg.experiment, tags=run_tags, attach=attach, artifact_location=sqlite_artifact_location(uri),
        run_file_dir=None if attach else Path(out_dir), supersedes=supersedes,
    )
    if cfg.start_timeout_s > 0:
        sink.wait_ready(cfg.start_timeout_s)
    return sink
