"""Our MLflow transport (pipeline/tracking/mlflow_sink.py) against MLflow's own asynchronous logging, on what the
transport promises: a dead server never blocks or fails a training step; drops are counted; memory stays bounded;
sqlite's "database is locked" is retried.

Transports (each scenario runs in its own process, so RSS and threads are the transport's alone):

- ``ours``: ``make_sink(TrackingConfig(...))``, the config's defaults except ``timeout_s=2`` (HTTP timeout),
  ``start_timeout_s=2`` and ``flush_timeout_s=5`` (``finish``'s bound; ``--flush-cap`` in the outage,
  ``--sqlite-flush-s`` for the sqlite writers, the same wait MLflow's flush gets there);
- ``mlflow-default``: ``MlflowClient.log_batch(..., synchronous=False)`` and ``mlflow.flush_async_logging()``
  with MLflow's defaults (7 HTTP retries, backoff factor 2, 120 s timeout, no buffering);
- ``mlflow-tuned``: the same with the settings closest to ours that MLflow allows and most favourable to a
  bounded flush: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`` (3 attempts, as ours), ``..._BACKOFF_FACTOR=1`` (an int:
  1 s is its smallest non-zero backoff), ``..._TIMEOUT=2``, ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=1`` (merges
  queued calls into batches of up to 1000 values, fewer requests).

Scenarios:

1. ``refused`` (nothing listens on the port) and ``hung`` (a socket on 127.0.0.1 that accepts and never answers):
   ``--calls`` calls of 10 metric values, back to back; each call timed on the training thread; whether any raised;
   starting the run (ours: ``make_sink``; MLflow: ``create_run``, timed in a thread next to the calls); how long
   ``finish``/``flush`` takes (MLflow's has no timeout: given up after ``--flush-cap`` s); peak RSS growth and
   the backlog after the calls (items queued: calls; with MLflow's buffering, partly merged batches).
2. ``outage``: a real ``mlflow server`` behind a TCP proxy on 127.0.0.1; the proxy stops listening (and cuts open
   connections) for ``--outage-s`` s while the client logs one call every 5 ms, then listens again; afterwards
   the store is read back: values lost against what the API reported.
3. ``sqlite-contention``: ``--writers`` processes x ``--batches`` calls (10 metrics and a tag each) into one
   pre-initialised sqlite store at once, plus ``--burners`` busy-loop processes; values lost and failures reported.
   ``sqlite-held-lock``: another connection holds the store's write lock for ``--hold-s`` s (past MLflow's 20 s
   busy timeout: a long read or write elsewhere) while one process per transport logs 20 calls.

Every server, proxy, socket and process it starts is stopped (process groups killed) before it exits.

    .venv/bin/python benchmarks/tracking_transport.py                       # all scenarios, ~5 min on 2 cores
    .venv/bin/python benchmarks/tracking_transport.py --only dead --calls 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository: pipeline/ and tests/helpers import

KEYS = [f"train/m{i}" for i in range(10)]  # one call: 10 metric values, as a training's log tick
TRANSPORTS = ("ours", "mlflow-default", "mlflow-tuned")
MLFLOW_TUNED_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}
MLFLOW_ENV_NAMES = (*MLFLOW_TUNED_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ASYNC_LOGGING")


# ---- helpers of both sides ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples this process's RSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        return self.peak


class LogCount(logging.Handler):
    """Counts WARNING+ records (the lines a user sees) of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def count_warnings() -> LogCount:
    """A handler on MLflow's and our loggers, attached after ``import mlflow`` (which configures its logger)."""
    import mlflow  # noqa: F401 (its import cost is not the transport's: paid before anything is timed)

    lines = LogCount()
    for name in ("mlflow", "pipeline"):
        logging.getLogger(name).addHandler(lines)
    return lines


def call_in_thread(fn: Any, cap_s: float) -> tuple[float, str]:
    """Run fn in a daemon thread; (seconds, "ok" | "raised: ..." | "still blocked") after at most cap_s."""
    out: dict[str, str] = {}

    def run() -> None:
        try:
            fn()
            out["r"] = "ok"
        except Exception as exc:
            out["r"] = f"raised {type(exc).__name__}"

    t0 = time.perf_counter()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(cap_s)
    return time.perf_counter() - t0, out.get("r", "still blocked")


def latency_stats(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"median_us": statistics.median(s) * 1e6, "p99_us": s[int(0.99 * (len(s) - 1))] * 1e6,
            "max_ms": s[-1] * 1e3}


# ---- the transports, as a training's process uses them (child side) ---------------------------------------


class Ours:
    def __init__(self, uri: str, out_dir: str, **cfg: Any) -> None:
        from pipeline.config import TrackingConfig
        from pipeline.tracking.factory import make_sink

        base = dict(uri=uri, experiment="bench", timeout_s=2.0, start_timeout_s=2.0, flush_timeout_s=5.0)
        base.update(cfg)
        t0 = time.perf_counter()
        self.sink = make_sink(TrackingConfig(**base), out_dir=out_dir, is_main_process=True, run_name="bench")
        self.start = (time.perf_counter() - t0, "ok")
        self.run_id = self.sink.run_id

    def log(self, step: int, tag: bool = False) -> None:
        self.sink.log_metrics({k: float(step) + i / 10 for i, k in enumerate(KEYS)}, step=step)
        if tag:
            self.sink.set_tags({"last_step": step})

    def backlog(self) -> int:
        return self.sink._queue.qsize()

    def finish(self, cap_s: float) -> tuple[float, str]:
        t0 = time.perf_counter()
        self.sink.finish("FINISHED")
        return time.perf_counter() - t0, "ok"

    def reported(self) -> dict[str, Any]:
        stats = self.sink.stats
        return {"dropped_values": self.sink.dropped, "dropped_calls": stats.get("dropped_ops", 0),
                "lock_waits": stats.get("lock_waits", 0)}


class MlflowAsync:
    def __init__(self, uri: str, *, run_id: str | None = None, experiment: str = "bench") -> None:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(uri)  # mlflow.flush_async_logging() flushes this URI's store (the client's, cached)
        self.mlflow = mlflow
        self.client = MlflowClient(uri)
        self.ops: list[Any] = []
        self.run_id = run_id
        if run_id is None:
            t0 = time.perf_counter()
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name="bench").info.run_id
            self.start = (time.perf_counter() - t0, "ok")

    def log(self, step: int, tag: bool = False) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(step) + i / 10, now, step) for i, k in enumerate(KEYS)]
        tags = [RunTag("last_step", str(step))] if tag else []
        self.ops.append(self.client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=False))

    def backlog(self) -> int:
        q = self.client._tracking_client.store._async_logging_queue  # calls not yet sent or failed
        pool = getattr(q, "_batch_logging_worker_threadpool", None)
        return q._queue.qsize() + (pool._work_queue.qsize() if pool is not None else 0)

    def finish(self, cap_s: float) -> tuple[float, str]:
        return call_in_thread(self.mlflow.flush_async_logging, cap_s)

    def reported(self) -> dict[str, Any]:
        """What the API tells: each call's RunOperations.wait() raises if its batch failed (only once done)."""
        failed = pending = 0
        for op in self.ops:
            if not all(f.done() for f in op._operation_futures):  # wait() would block: not asked
                pending += 1
                continue
            try:
                op.wait()
            except Exception:
                failed += 1
        return {"failed_calls_by_futures": failed, "calls_pending": pending}


def mlflow_env(transport: str) -> None:
    for name in MLFLOW_ENV_NAMES:
        os.environ.pop(name, None)
    if transport == "mlflow-tuned":
        os.environ.update(MLFLOW_TUNED_ENV)


def timed_log(tr: Any, i: int, lat: list[float]) -> int:
    """One logging call as a training step makes it: its time appended to ``lat``; 1 if it raised, else 0."""
    t0 = time.perf_counter()
    try:
        tr.log(i)
        return 0
    except Exception:
        return 1
    finally:
        lat.append(time.perf_counter() - t0)


def child_dead(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 1: a server that refuses or hangs, for the whole run."""
    mlflow_env(args.transport)
    lines = count_warnings()
    starter = None
    if args.transport == "ours":
        tr: Any = Ours(args.uri, tempfile.mkdtemp(prefix="bench-ours-"))
    else:
        tr = MlflowAsync(args.uri, run_id=uuid.uuid4().hex)  # no run can be created on a dead server
        starter = threading.Thread(target=lambda: setattr(tr, "start", call_in_thread(
            lambda: tr.client.create_run("0"), args.start_cap)), daemon=True)
        starter.start()  # create_run is synchronous: timed next to the calls
    tr.log(-1)  # warm-up (first-call imports)
    time.sleep(0.5)
    rss0 = rss_mb()
    peak = PeakRss()
    lat, raised, marks = [], 0, {}
    for i in range(args.calls):
        raised += timed_log(tr, i, lat)
        if i + 1 in (args.calls // 10, args.calls):
            marks[i + 1] = {"rss_growth_mb": round(rss_mb() - rss0, 1), "backlog_calls": tr.backlog()}
    finish_s, finish_r = tr.finish(args.flush_cap)
    peak_mb = peak.stop()
    if starter is not None:
        starter.join(args.start_cap)
    start = getattr(tr, "start", (args.start_cap, "still blocked"))
    return {"scenario": args.server, "transport": args.transport, "calls": args.calls, **latency_stats(lat),
            "raised": raised, "start_s": round(start[0], 2), "start": start[1], "finish_s": round(finish_s, 2),
            "finish": finish_r, "marks": marks, "peak_rss_growth_mb": round(peak_mb - rss0, 1),
            "reported": tr.reported(), "warning_lines": lines.n}


def child_outage(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 2: logs paced calls; the parent takes the proxy down and up meanwhile (READY on stdout)."""
    mlflow_env(args.transport)
    lines = count_warnings()
    if args.transport == "ours":
        tr: Any = Ours(args.uri, tempfile.mkdtemp(prefix="bench-ours-"), start_timeout_s=30.0,
                       flush_timeout_s=args.flush_cap)
    else:
        tr = MlflowAsync(args.uri)
    for i in range(200):  # 1 s with the server up
        tr.log(i)
        time.sleep(0.005)
    print(json.dumps({"ready": tr.run_id}), flush=True)
    lat, raised = [], 0
    deadline = time.monotonic() + args.outage_s + args.after_s  # the outage, then the server back
    i = 200
    while time.monotonic() < deadline:
        raised += timed_log(tr, i, lat)
        i += 1
        time.sleep(0.005)
    finish_s, finish_r = tr.finish(args.flush_cap)
    return {"transport": args.transport, "run_id": tr.run_id, "calls": i, **latency_stats(lat), "raised": raised,
            "finish_s": round(finish_s, 2), "finish": finish_r, "reported": tr.reported(),
            "warning_lines": lines.n}


def child_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 3: one writer of a shared sqlite store; waits for GO on stdin after creating its run."""
    mlflow_env(args.transport)
    lines = count_warnings()
    if args.transport == "ours":
        out_dir = Path(args.workdir) / args.name
        out_dir.mkdir(parents=True, exist_ok=True)  # a training's out_dir exists: the run file goes there
        tr: Any = Ours(args.uri, str(out_dir), start_timeout_s=120.0,
                       flush_timeout_s=args.flush_cap)
    else:
        tr = MlflowAsync(args.uri)
    print(json.dumps({"ready": tr.run_id}), flush=True)
    sys.stdin.readline()  # GO
    lat = []
    for i in range(args.batches):
        t0 = time.perf_counter()
        tr.log(i, tag=True)
        lat.append(time.perf_counter() - t0)
    finish_s, finish_r = tr.finish(args.flush_cap)
    return {"transport": args.transport, "run_id": tr.run_id, **latency_stats(lat), "finish_s": round(finish_s, 2),
            "finish": finish_r, "reported": tr.reported(), "warning_lines": lines.n}


# ---- the parent: servers, proxies, processes ---------------------------------------------------------------


class Hole:
    """A socket on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()


class Proxy:
    """127.0.0.1:port -> target_port; ``down()`` stops listening and cuts open connections; ``up()`` listens."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        s, self.listener = self.listener, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                c = s.accept()[0]
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for x in (src, dst):
            with contextlib.suppress(OSError):
                x.shutdown(socket.SHUT_RDWR)


class Children:
    """Child processes in their own process groups; every group is killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.workdir = workdir

    def start(self, argv: list[str], *, stdin: bool = False, name: str = "child") -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_NAMES}
        env["PYTHONUNBUFFERED"] = "1"
        err = open(self.workdir / f"{name}-{len(self.procs)}.stderr", "wb")  # noqa: SIM115 (closed with the child)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=True)
        err.close()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def me(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra]


def last_json(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"no result within {timeout_s:.0f} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}, no result"}


def read_line_json(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any] | None:
    """The child's next JSON line on stdout (READY), or None if it did not come within timeout_s."""
    box: dict[str, Any] = {}

    def read() -> None:
        for ln in proc.stdout:  # type: ignore[union-attr]
            if ln.startswith("{"):
                box["v"] = json.loads(ln)
                return

    th = threading.Thread(target=read, daemon=True)
    th.start()
    th.join(timeout_s)
    return box.get("v")


def stored_values(client: Any, run_id: str) -> int:
    return sum(len(client.get_metric_history(run_id, k)) for k in KEYS)


def scenario_dead(args: argparse.Namespace, kids: Children) -> list[dict[str, Any]]:
    results = []
    hole = Hole()
    try:
        servers = (("refused", f"http://127.0.0.1:{free_port()}"), ("hung", f"http://127.0.0.1:{hole.port}"))
        for server, uri in servers:
            for transport in TRANSPORTS:
                proc = kids.start(me("--child", "dead", "--server", server, "--transport", transport, "--uri", uri,
                                     "--calls", str(args.calls), "--flush-cap", str(args.flush_cap),
                                     "--start-cap", str(args.start_cap)), name=f"dead-{server}-{transport}")
                res = last_json(proc, 60 + args.flush_cap + args.start_cap)
                res.setdefault("scenario", server)
                res.setdefault("transport", transport)
                results.append(res)
                print(json.dumps(res), flush=True)
    finally:
        hole.close()
    return results


def scenario_outage(args: argparse.Namespace, kids: Children) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    from tests.helpers.mlflow_server import mlflow_server

    results = []
    with mlflow_server(kids.workdir / "server") as srv:
        client = MlflowClient(srv.uri)
        for transport in TRANSPORTS:
            proxy = Proxy(srv.port)
            proxy.up()
            try:
                proc = kids.start(me("--child", "outage", "--transport", transport, "--uri",
                                     f"http://127.0.0.1:{proxy.port}", "--outage-s", str(args.outage_s),
                                     "--after-s", str(args.after_s), "--flush-cap", str(args.flush_cap)),
                                  name=f"outage-{transport}")
                ready = read_line_json(proc, 90)
                if ready is None:
                    res: dict[str, Any] = {"error": "no run within 90 s"}
                else:
                    proxy.down()
                    time.sleep(args.outage_s)
                    proxy.up()
                    res = last_json(proc, 60 + args.outage_s + args.after_s + args.flush_cap)
                if "run_id" in res:
                    time.sleep(1.0)
                    logged = res["calls"] * len(KEYS)
                    stored = stored_values(client, res["run_id"])
                    res.update(logged_values=logged, stored_values=stored, lost_values=logged - stored)
            finally:
                proxy.down()
            res.update(scenario="outage", transport=transport)
            results.append(res)
            print(json.dumps(res), flush=True)
    return results


def _init_store(db: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    client.create_experiment("bench")  # the writers find it: no creation race in this measurement
    return uri


def _writers(args: argparse.Namespace, kids: Children, uri: str, transports: list[str], batches: int,
             hold_s: float = 0.0, burners: int = 0) -> list[dict[str, Any]]:
    procs = [kids.start(me("--child", "sqlite", "--transport", t, "--uri", uri, "--batches", str(batches),
                           "--workdir", str(kids.workdir), "--name", f"w{i}-{t}",
                           "--flush-cap", str(args.sqlite_flush_s)),
                        stdin=True, name=f"sqlite-{t}") for i, t in enumerate(transports)]
    ready = [read_line_json(p, 180) for p in procs]
    burn = [kids.start([sys.executable, "-c", f"import time\nt = time.time() + {args.sqlite_flush_s + 60}\n"
                        "while time.time() < t: pass"], name="burner") for _ in range(burners)]
    holder = None
    if hold_s:
        holder = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    for p in procs:
        p.stdin.write("GO\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    if holder is not None:
        time.sleep(max(0.0, hold_s - (time.monotonic() - t0)))
        holder.execute("ROLLBACK")
        holder.close()
    out = [last_json(p, 120 + args.sqlite_flush_s) if r is not None else {"error": "no run"}
           for p, r in zip(procs, ready)]
    for b in burn:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(b.pid, signal.SIGKILL)
        b.wait()
    return out


def scenario_sqlite(args: argparse.Namespace, kids: Children) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    results = []
    cases = [("sqlite-contention", [t] * args.writers, args.batches, 0.0, args.burners)
             for t in ("ours", "mlflow-default")]
    cases.append(("sqlite-held-lock", ["ours", "mlflow-default"], 20, args.hold_s, 0))
    for n, (scenario, transports, batches, hold_s, burners) in enumerate(cases):
        uri = _init_store(kids.workdir / f"store{n}.db")
        t0 = time.monotonic()
        out = _writers(args, kids, uri, transports, batches, hold_s, burners)
        wall = time.monotonic() - t0
        client = MlflowClient(uri)
        for transport in sorted(set(transports)):
            mine = [r for r, t in zip(out, transports) if t == transport]
            logged = batches * len(KEYS) * len(mine)
            stored = sum(stored_values(client, r["run_id"]) for r in mine if "run_id" in r)
            res = {"scenario": scenario, "transport": transport, "writers": len(mine), "batches": batches,
                   "hold_s": hold_s, "burners": burners, "wall_s": round(wall, 1), "logged_values": logged,
                   "stored_values": stored, "lost_values": logged - stored,
                   "max_call_ms": max((r.get("max_ms", 0.0) for r in mine), default=None),
                   "finish_s": [r.get("finish_s") for r in mine], "finish": [r.get("finish") for r in mine],
                   "reported": [r.get("reported") or r.get("error") for r in mine],
                   "warning_lines": sum(r.get("warning_lines", 0) for r in mine)}
            results.append(res)
            print(json.dumps(res), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("dead", "outage", "sqlite"), action="append",
                   help="run only these scenarios (repeatable); default: all")
    p.add_argument("--calls", type=int, default=20000, help="calls (10 values each) against a dead/hung server")
    p.add_argument("--flush-cap", type=float, default=10.0, help="give up on MLflow's flush after this (s)")
    p.add_argument("--start-cap", type=float, default=10.0, help="give up on MLflow's create_run after this (s)")
    p.add_argument("--outage-s", type=float, default=10.0, help="the proxy is down this long")
    p.add_argument("--after-s", type=float, default=6.0, help="calls go on this long after it is back")
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--burners", type=int, default=2, help="busy-loop processes during the contention run")
    p.add_argument("--sqlite-flush-s", type=float, default=120.0,
                   help="sqlite writers: finish's bound (ours) and the wait for MLflow's flush")
    p.add_argument("--hold-s", type=float, default=25.0, help="write lock held this long (MLflow waits 20 s)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    # child side
    p.add_argument("--child", choices=("dead", "outage", "sqlite"), help=argparse.SUPPRESS)
    p.add_argument("--transport", choices=TRANSPORTS, help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        res = {"dead": child_dead, "outage": child_outage, "sqlite": child_sqlite}[args.child](args)
        print(json.dumps(res), flush=True)
        os._exit(0)  # MLflow's async workers (non-daemon, joined at exit) would wait out their backlog

    import platform

    import mlflow

    only = set(args.only or ("dead", "outage", "sqlite"))
    t0 = time.monotonic()
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "mlflow": mlflow.__version__, "loadavg_at_start": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:]}
    print(json.dumps(machine), flush=True)
    results: list[dict[str, Any]] = [machine]
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as tmp:
        kids = Children(Path(tmp))
        try:
            if "dead" in only:
                results += scenario_dead(args, kids)
            if "outage" in only:
                results += scenario_outage(args, kids)
            if "sqlite" in only:
                results += scenario_sqlite(args, kids)
        finally:
            kids.kill_all()
    print(f"# total {time.monotonic() - t0:.0f} s, load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
