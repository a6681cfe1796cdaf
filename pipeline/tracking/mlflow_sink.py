"""The MLflow transport of the tracking interface: one run, a bounded queue, one sender thread, retries, outages.

Built by ``pipeline.tracking.factory.make_sink`` on the main process. The training loop must never wait on the
network and never see an exception from tracking. So every call only puts an item on a bounded queue;
one background thread sends the items with MLflow's client, retries a failing call a few times
(tenacity), and after that treats the store as down: it drops calls (counted in ``sink.dropped``) and
probes it once per ``probe_interval_s`` until it answers again. A process that exits without
``finish`` marks the run FAILED (atexit).

A sqlite store is shared by the trainings (and evaluations) of a project: its "database is locked" is
another process writing, not an outage, so those calls are retried patiently (``LOCK_PATIENCE_S``) before
they count as failed; and a new store's tables are created under a file lock (``<db>.lock``), because
two processes migrating one fresh database at once can leave it unusable.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import random
import sqlite3
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import ExclusiveFileLock
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
    _validate_metric_name,
)
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from pipeline.config import TrackingConfig
from pipeline.tracking.images import to_hwc_uint8
from pipeline.tracking.sink import RUN_FILE, STATUSES, DatasetInfo, NullSink, sqlite_path, write_run_file

log = logging.getLogger(__name__)

# The MLflow 3 UI opens an experiment on its GenAI overview unless this experiment tag says otherwise
# (the UI's own ExperimentKind values; mlflow has no Python constant for it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the classic training-runs view
# How long one call keeps retrying while a sqlite store is locked by another process (each attempt also
# waits up to MLflow's own 20 s busy timeout); only then does it count as a failed attempt.
LOCK_PATIENCE_S = 60.0


@dataclass
class _Op:
    kind: str  # metrics | params | tags | image | artifact | text | dataset | status | finish
    payload: Any
    n_metrics: int = 0  # metric values inside, for the dropped count


def sqlite_schema_current(db: Path) -> bool:
    """True when the sqlite store ``db`` holds MLflow's tables at this MLflow's newest schema revision: migrations
    are over, so opening it creates nothing (MLflow creates tables only when some are missing) and needs no lock.
    False for a missing, new, half-created or older store, or one that cannot be read now."""
    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    # mlflow's own reading of its migration scripts (what its schema check compares with; no database touched).
    # Imported here: it brings sqlalchemy and alembic, which only a process with a sqlite store needs.
    from mlflow.store.db.utils import _get_latest_schema_revision

    return row is not None and row[0] == _get_latest_schema_revision()


def _sqlite_locked(exc: BaseException) -> bool:
    """SQLite's busy/locked error, however wrapped: MLflow raises it as an MlflowException with error code
    TEMPORARILY_UNAVAILABLE (503) whose cause is sqlalchemy's OperationalError "database is locked"."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).lower()
        if "database is locked" in text or "database table is locked" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection problems, server errors and a locked sqlite store, not a request the
    store rejects (4xx)."""
    if _sqlite_locked(exc):
        return True
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return not isinstance(exc, (ValueError, TypeError, FileNotFoundError))


class MLflowSink(NullSink):
    """Logs into one MLflow run through a bounded queue and a background sender thread."""

    def __init__(self, cfg: TrackingConfig, *, tracking_uri: str, run_id: str | None, run_name: str,
                 experiment: str, tags: dict[str, str], attach: bool, artifact_location: str | None,
                 run_file_dir: Path | None = None, supersedes: str | None = None) -> None:
        if tracking_uri.startswith(("http://", "https://")):
            # MLflow's defaults (7 retries with backoff, 120 s timeout) keep a dead server busy for minutes;
            # our sender retries instead.
            _set_http_env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            _set_http_env("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(cfg.timeout_s))))
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self._run_name = run_name
        self._experiment = experiment
        self._tags = tags
        self._attach = attach
        self._artifact_location = artifact_location
        self._run_file_dir = run_file_dir
        self._supersedes = supersedes
        self._finish_deadline = math.inf
        self._queue: queue.Queue[_Op] = queue.Queue(maxsize=cfg.queue_size)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._down_since: float | None = None
        self._last_probe = 0.0
        self._ready = threading.Event()
        self._done = threading.Event()
        self._finished = False
        self._closed = False
        self._pid = os.getpid()
        self._client: Any = None
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor (tracking.system_metrics)
        self._monitor_failed = False
        self._awaiting_status = run_id is not None and not attach  # a resumed run is RUNNING once "status" is sent
        self._last_warned: dict[str, float] = {}
        if run_id is not None and not attach:
            self._put(_Op("status", "RUNNING"))
        self._thread = threading.Thread(target=self._worker, name="mlflow-sink", daemon=True)
        self._thread.start()
        # A process that dies without finish() leaves a RUNNING run forever; mark it. Weak, so a
        # sink that is garbage does not stay alive for the hook.
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s._at_exit())

    # ---- the training side: never blocks, never raises --------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def dropped(self) -> int:
        return self._counts["dropped_metrics"]

    @property
    def stats(self) -> dict[str, int]:
        """Counters: sent_ops, dropped_ops, dropped_metrics, failed_attempts, queue_full."""
        with self._lock:
            return dict(self._counts)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the first attempt to create/continue the run has ended; True if a run id is known."""
        self._ready.wait(timeout_s)
        return self._run_id is not None

    def settled_run_id(self, timeout_s: float) -> str | None:
        if self._run_id is None and not self._ready.is_set():
            t0 = time.monotonic()
            if self._ready.wait(timeout_s):
                log.info("tracking: waited %.1f s for the run to exist at %s", time.monotonic() - t0, self.tracking_uri)
            else:
                log.warning("tracking: the run at %s is still being created after %.0f s more; this checkpoint "
                            "records no run id (%s in its out_dir names the run once it exists, and a resume "
                            "continues it)", self.tracking_uri, timeout_s, RUN_FILE)
        return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {str(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        self._put(_Op("params", flat))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        now_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                _validate_metric_name(str(key))  # here: one bad key would make the store reject the whole batch
                batch.append(Metric(str(key), float(value), now_ms, int(step)))
            except (TypeError, ValueError, MlflowException) as exc:
                self._warn_limited("bad_metric", f"metric {key!r}={value!r} not logged: {_short(exc)}")
        if batch:
            self._put(_Op("metrics", batch, n_metrics=len(batch)))

    def log_image(self, image: Any, key: str, step: int) -> None:
        try:
            arr = to_hwc_uint8(image)
        except ValueError as exc:
            self._warn_limited("bad_image", f"image {key!r} not logged: {exc}")
            return
        self._put(_Op("image", (arr, key, int(step))))

    def log_artifact(self, path: str | os.PathLike | None = None, *, text: str | None = None,
                     name: str | None = None, artifact_path: str | None = None) -> None:
        if text is not None:
            if not name:
                self._warn_limited("bad_artifact", "log_artifact(text=...) needs name=...; not logged")
                return
            self._put(_Op("text", (text, name if artifact_path is None else f"{artifact_path}/{name}")))
        elif path is not None:
            self._put(_Op("artifact", (str(path), artifact_path)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(_Op("tags", {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}))

    def log_dataset(self, dataset: DatasetInfo, context: str = "training") -> None:
        self._put(_Op("dataset", (dataset, str(context))))

    def flush(self, timeout_s: float) -> bool:
        if self._finished or self._closed:
            return self._done.is_set()
        event = threading.Event()
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(_Op("flush", event), timeout=max(0.0, timeout_s))
        except queue.Full:
            return False
        return event.wait(max(0.0, deadline - time.monotonic()))

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished or os.getpid() != self._pid:
            return
        self._finished = True
        if status not in STATUSES:
            log.warning("tracking: finish(status=%r) is not one of %s; using FAILED", status, STATUSES)
            status = "FAILED"
        deadline = time.monotonic() + self.cfg.flush_timeout_s
        self._finish_deadline = deadline  # the sender retries the final status until then
        # finish must get through even when the queue is full: wait for room, within the same bound
        with contextlib.suppress(queue.Full):
            self._queue.put(_Op("finish", status), timeout=max(0.0, deadline - time.monotonic()))
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            self._closed = True  # the sender drops what it holds and exits at its next turn
            left = self._drain_and_count()
            log.warning(
                "tracking: gave up flushing to %s after %.1f s; %d queued calls dropped (%d metric values "
                "dropped in all)", self.tracking_uri, self.cfg.flush_timeout_s, left, self.dropped,
            )
        elif self.dropped:
            log.warning("tracking: run %s finished; %d metric values were dropped (see warnings above)",
                        self._run_id, self.dropped)

    def _at_exit(self) -> None:
        if not self._finished and os.getpid() == self._pid:
            self.finish("FAILED")

    def _put(self, op: _Op) -> None:
        if self._finished:
            return
        if self._closed:
            self._count_drop(op)
            return
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._count_drop(op)
            self._count("queue_full")
            self._warn_limited(
                "queue_full",
                f"tracking queue full ({self.cfg.queue_size} calls; the store at {self.tracking_uri} is slow "
                f"or down): dropping calls ({self.dropped} metric values dropped so far)",
            )

    def _drain_and_count(self) -> int:
        n = 0
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return n
            self._count_drop(op)
            n += 1

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _count_drop(self, op: _Op) -> None:
        with self._lock:
            self._counts["dropped_ops"] += 1
            self._counts["dropped_metrics"] += op.n_metrics

    def _warn_limited(self, key: str, msg: str, every_s: float = 60.0) -> None:
        """The first warning of a kind always, then at most one per minute (a log flood helps nobody)."""
        last = self._last_warned
        now = time.monotonic()
        if key not in last or now - last[key] >= every_s:
            last[key] = now
            log.warning("tracking: %s", msg)

    # ---- the sender thread --------------------------------------------------------------------------

    def _worker(self) -> None:
        try:
            self._client = self._open_client()
        except Exception as exc:  # e.g. an unknown URI scheme: nothing can be logged, training goes on
            log.warning("tracking: cannot open %s (%s); nothing will be logged", self.tracking_uri, _short(exc))
            self._closed = True
            self._ready.set()
            self._done.set()
            return
        if self._run_id is None:
            self._call(self._create_run, what="create run", attempts=self.cfg.retries)
        else:
            self._call(self._read_experiment_id, what="read the run", attempts=self.cfg.retries)
            if self._run_file_dir is not None:
                self._record_run()
        if self._supersedes and self._supersedes != self._run_id:
            self._call(self._mark_superseded, what="mark the previous run", attempts=self.cfg.retries)
        self._ready.set()
        self._maybe_start_monitor()
        pending: _Op | None = None
        while not self._closed:
            try:
                op = pending or self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            pending = None
            if op.kind == "metrics":  # coalesce consecutive metric calls into one request
                batch = list(op.payload)
                while len(batch) < MAX_METRICS_PER_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt.kind != "metrics" or len(batch) + len(nxt.payload) > MAX_METRICS_PER_BATCH:
                        pending = nxt
                        break
                    batch.extend(nxt.payload)
                op = _Op("metrics", batch, n_metrics=len(batch))
            if op.kind == "flush":
                op.payload.set()
                continue
            if self._closed:
                self._count_drop(op)
                return
            try:
                self._process(op)
            except Exception as exc:  # a bug here must not kill the sender and fill the queue
                self._count_drop(op)
                self._warn_limited("internal", f"{op.kind} not logged: {_short(exc)}")
            if op.kind == "finish":
                self._done.set()
                return
            self._maybe_start_monitor()
        if pending is not None:
            self._count_drop(pending)

    def _process(self, op: _Op) -> None:
        if self._run_id is None and not self._call(self._create_run, what="create run", attempts=None):
            if op.kind == "finish":
                return
            self._count_drop(op)
            return
        send = {
            "metrics": self._send_metrics, "params": self._send_params, "tags": self._send_tags,
            "image": self._send_image, "artifact": self._send_artifact, "text": self._send_text,
            "dataset": self._send_dataset, "status": self._send_status, "finish": self._send_finish,
        }[op.kind]
        if op.kind == "finish":
            # The final status matters most (a run left RUNNING looks alive for ever): retried, whatever the
            # probe interval, until finish()'s deadline.
            while not self._call(lambda: send(op.payload), what="finish", attempts=1):
                wait = min(max(self.cfg.retry_wait_s, 0.1), self._finish_deadline - time.monotonic() - 0.1)
                if wait <= 0 or self._closed:
                    return
                time.sleep(wait)
            self._count("sent_ops")
            return
        if self._call(lambda: send(op.payload), what=op.kind, attempts=None):
            self._count("sent_ops")
        else:
            self._count_drop(op)

    def _call(self, fn: Any, *, what: str, attempts: int | None) -> bool:
        """Run ``fn`` with retries; False (and a warning) if it failed. ``attempts=None``: by outage state."""
        if attempts is None:
            if self._down_since is not None:
                now = time.monotonic()
                if now - self._last_probe < self.cfg.probe_interval_s:
                    return False  # down and not yet time to probe: drop without touching the network
                self._last_probe = now
                attempts = 1
            else:
                attempts = self.cfg.retries
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=self.cfg.retry_wait_s, max=8 * max(self.cfg.retry_wait_s, 0.1)),
            # a store still locked after LOCK_PATIENCE_S is as good as down: no more attempts on top
            retry=retry_if_exception(lambda e: _transient(e) and not _sqlite_locked(e)),
            before_sleep=lambda _state: self._count("failed_attempts"),
            reraise=True,
        )
        try:
            retrying(self._patient, fn)
        except Exception as exc:
            self._count("failed_attempts")
            if _transient(exc):
                if self._down_since is None:
                    self._down_since = self._last_probe = time.monotonic()
                    log.warning(
                        "tracking: %s failed at %s after %d attempt(s): %s. Training goes on; tracking calls "
                        "are dropped (counted) and the store is probed every %.0f s",
                        what, self.tracking_uri, attempts, _short(exc), self.cfg.probe_interval_s,
                    )
            else:
                self._warn_limited(f"rejected_{what}", f"{what} rejected by {self.tracking_uri}: {_short(exc)}")
            return False
        if self._down_since is not None:
            log.warning("tracking: %s answers again after %.1f s; %d metric values were dropped meanwhile",
                        self.tracking_uri, time.monotonic() - self._down_since, self.dropped)
            self._down_since = None
        return True

    def _patient(self, fn: Any) -> Any:
        """``fn()``, retried while a sqlite store is locked by another process (contention, not an outage),
        for at most LOCK_PATIENCE_S (and not past finish()'s deadline)."""
        deadline = min(time.monotonic() + LOCK_PATIENCE_S, self._finish_deadline)
        wait = 0.05
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _sqlite_locked(exc) or self._closed or time.monotonic() + wait > deadline:
                    raise
            self._count("lock_waits")
            time.sleep(wait * (0.5 + random.random()))  # jitter: two writers do not retry in lockstep
            wait = min(2 * wait, 2.0)

    def _open_client(self) -> MlflowClient:
        """The client; a new sqlite store's tables are created under ``<db>.lock`` (see the module doc). A store
        whose schema is complete already is opened without that lock: opening costs seconds of CPU, and
        processes queued on the lock one after the other made the last one wait for all of them (measured:
        6-17 s for 4 trainings on a loaded 2-core host, past ``start_timeout_s``)."""
        db = sqlite_path(self.tracking_uri)
        if db is not None and os.name != "nt" and not sqlite_schema_current(db):
            with ExclusiveFileLock(f"{db}.lock"):
                if not sqlite_schema_current(db):  # not created meanwhile by the process that held the lock
                    return self._patient(lambda: MlflowClient(tracking_uri=self.tracking_uri))
        return self._patient(lambda: MlflowClient(tracking_uri=self.tracking_uri))

    def _create_run(self) -> None:
        client = self._client
        exp = client.get_experiment_by_name(self._experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self._experiment, artifact_location=self._artifact_location,
                                                  tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as exc:  # another process created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(self._experiment)
        if exp is not None:
            exp_id = exp.experiment_id
            self._ensure_experiment_kind(exp)
        run = client.create_run(exp_id, tags=self._tags, run_name=self._run_name)
        self.experiment_id = run.info.experiment_id
        self._run_id = run.info.run_id
        self._record_run()

    def _read_experiment_id(self) -> None:
        """The experiment of a run this sink continues or attaches to (for the UI's URL); a run that does not
        exist is left to the status call (a resume starts a new run) or to the calls that follow."""
        try:
            self.experiment_id = self._client.get_run(self._run_id).info.experiment_id
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _ensure_experiment_kind(self, exp: Any) -> None:
        """The classic runs view for an experiment without a kind; a kind someone chose is left alone."""
        if not exp.tags.get(EXPERIMENT_KIND_TAG):
            self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _record_run(self) -> None:
        if self._run_file_dir is None or self._run_id is None:
            return
        try:
            write_run_file(self._run_file_dir, self._run_id, self.tracking_uri)
        except OSError as exc:  # the checkpoints still record the run; say so, do not stop the sender
            self._warn_limited("run_file", f"cannot write {self._run_file_dir}/{RUN_FILE}: {_short(exc)}")

    def _mark_superseded(self) -> None:
        """A run of this out_dir that a dead job left RUNNING, and that this job does not continue."""
        try:
            old = self._client.get_run(self._supersedes)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise
        if old.info.status == "RUNNING":
            self._client.set_tag(self._supersedes, "ddpm.superseded_by", self._run_id or "")
            self._client.set_terminated(self._supersedes, status="KILLED")
            log.warning("tracking: run %s was left RUNNING by a job that died; marked KILLED (this job logs "
                        "into %s)", self._supersedes, self._run_id)

    def _send_status(self, status: str) -> None:
        try:
            run = self._client.get_run(self._run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("tracking: run %s to resume is not in %s (or deleted); starting a new run",
                        self._run_id, self.tracking_uri)
            self._run_id = None
            self._create_run()  # records the new run in the run file
            self._awaiting_status = False
            return
        self._client.update_run(self._run_id, status=status)
        self._awaiting_status = False
        # A run created before these conventions: its experiment's kind, and the tags this job knows.
        self._ensure_experiment_kind(self._client.get_experiment(run.info.experiment_id))
        stale = {k: v for k, v in self._tags.items() if run.data.tags.get(k) != v}
        if MLFLOW_GIT_COMMIT in stale and run.data.tags.get(MLFLOW_GIT_COMMIT):
            log.warning("tracking: run %s was started at commit %s and is continued at %s (its tag %s now "
                        "names the latter)", self._run_id, run.data.tags[MLFLOW_GIT_COMMIT],
                        stale[MLFLOW_GIT_COMMIT], MLFLOW_GIT_COMMIT)
        if stale:
            self._send_tags(stale)

    def _send_metrics(self, metrics: list) -> None:
        self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)

    def _send_params(self, params: dict[str, str]) -> None:
        # Params are immutable: skip those already there (resume), keep a changed value as a tag. MLflow's
        # log_batch splits the lists into requests of at most 100 params and tags itself.
        existing = self._client.get_run(self._run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        tags = [RunTag(f"param_changed.{k}", v[:MAX_TAG_VAL_LENGTH]) for k, v in changed.items()]
        self._client.log_batch(self._run_id, params=new, tags=tags, synchronous=True)
        if changed:
            self._warn_limited("param_changed", "params changed since this run was started: " + ", ".join(
                f"{k}: {existing[k]!r} -> {v!r}" for k, v in sorted(changed.items())
            ) + " (MLflow params are immutable; new values kept as tags param_changed.<key>)")

    def _send_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)

    def _send_image(self, payload: tuple) -> None:
        arr, key, step = payload
        self._client.log_image(self._run_id, arr, key=key, step=step, synchronous=True)

    def _send_artifact(self, payload: tuple) -> None:
        path, artifact_path = payload
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact {path} no longer exists (keep files until finish, or log text)")
        self._client.log_artifact(self._run_id, path, artifact_path)

    def _send_text(self, payload: tuple) -> None:
        text, name = payload
        self._client.log_text(self._run_id, text, name)

    def _send_dataset(self, payload: tuple) -> None:
        info, context = payload
        self._client.log_inputs(self._run_id, datasets=[_dataset_input(info, context)])

    def _send_finish(self, status: str) -> None:
        self._stop_monitor()  # its last samples go in before the run closes (the monitor stops on a closed run)
        if not self._attach:
            self._client.set_terminated(self._run_id, status=status)

    # ---- system metrics (MLflow's SystemMetricsMonitor: its own thread and client) -------------------

    def _maybe_start_monitor(self) -> None:
        """Start MLflow's monitor once the run is RUNNING (never raises: without psutil it warns once)."""
        if (not self.cfg.system_metrics or self._attach or self._monitor is not None or self._monitor_failed
                or self._run_id is None or self._awaiting_status or self._closed):
            return
        try:
            # mlflow: ~1.5-3 s of import, paid only by a process that talks to MLflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self._run_id, resume_logging=True, tracking_uri=self.tracking_uri)
            monitor.start()
        except Exception as exc:  # e.g. psutil missing (ImportError): training goes on without them
            self._monitor_failed = True
            log.warning("tracking: system metrics not logged (tracking.system_metrics=true): %s", _short(exc))
            return
        self._monitor = monitor

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as exc:
                self._warn_limited("system_metrics", f"stopping the system metrics monitor: {_short(exc)}")


def _dataset_input(info: DatasetInfo, context: str) -> Any:
    """``DatasetInfo`` as MLflow's DatasetInput: what ``mlflow.log_input`` would send, built without a
    pandas/numpy Dataset object (the shards are not loaded for this)."""
    # mlflow: ~1.5-3 s of import, paid only by a process that talks to MLflow
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    schema = None
    if info.image_size and info.channels:  # decoded samples: uint8 HWC images, int64 labels when labelled
        features = Schema([TensorSpec(np.dtype(np.uint8), (-1, info.image_size, info.image_size, info.channels),
                                      "image")])
        targets = Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]) if info.num_classes else None
        schema = json.dumps(TensorDatasetSchema(features=features, targets=targets).to_dict())
    dataset = Dataset(name=info.name, digest=info.sha256[:MAX_DATASET_DIGEST_SIZE], source_type=info.source_type,
                      source=info.source_json(), schema=schema, profile=json.dumps(info.profile, sort_keys=True))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:300] + "…"


_ENV_SET_BY_US: dict[str, str] = {}


def _set_http_env(name: str, value: str) -> None:
    """Set one of MLflow's HTTP variables (read per request) unless the user set it before us."""
    if name not in os.environ or os.environ[name] == _ENV_SET_BY_US.get(name):
        os.environ[name] = value
        _ENV_SET_BY_US[name] = value
