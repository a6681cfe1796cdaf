"""A real ``mlflow server`` on 127.0.0.1 for tests: sqlite backend, HTTP-served artifacts, stopped by PID.

    with mlflow_server(tmp_path) as server:
        server.uri            # http://127.0.0.1:PORT
        server.stop()         # the server and its workers are gone when this returns (outage tests)
    with mlflow_server(tmp_path, admin_password="...") as server:   # --app-name basic-auth, admin user "admin"

It starts in ~12 s on 2 cores, so share one per test module where the tests allow it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1 (tiny race until the server binds it; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group (server + uvicorn/gunicorn workers), SIGKILL what is left."""
        if self._stopped:
            return
        self._stopped = True
        pgid = self.proc.pid  # started with start_new_session: its group id is its PID
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        # Workers may outlive the parent for a few seconds; the group must be empty before we return.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def mlflow_server(root: str | os.PathLike, *, port: int | None = None, start_timeout_s: float = 90.0,
                  admin_password: str = "") -> Iterator[MlflowServer]:
    """Start ``mlflow server`` with its store under ``root``; wait for /health; always stop it on exit.

    The same ``root`` (and ``port``) again gives the same store back: a server that restarts. With
    ``admin_password``: ``--app-name basic-auth`` as docs/tracking.md sets it up (users in root/basic_auth.db, the
    admin user ``admin`` created with that password on the first start, a random CSRF key); every request but
    /health then needs a user's credentials.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{(root / 'server.db').resolve()}",
        "--artifacts-destination", str((root / "server-artifacts").resolve()),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {}
    if admin_password:
        config = root / "basic_auth.ini"
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{(root / 'basic_auth.db').resolve()}\nadmin_username = admin\n")
        cmd += ["--app-name", "basic-auth"]
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    with serving(cmd, port, root / "mlflow-server.log", start_timeout_s=start_timeout_s, env=env) as server:
        yield server


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log_path: Path, *, start_timeout_s: float = 90.0,
            env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """Run ``cmd`` (``mlflow server`` or ``mlflow ui`` on 127.0.0.1:``port``) in its own process group, with ``env``
    added to its environment, until it answers /health; always stop it on exit."""
    # No job runner: it would add ~7 huey consumer processes and a /dev/shm folder nobody removes.
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {}))
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=log_path.parent)
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.alive():
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{' '.join(cmd[:4])} on port {port} did not answer /health within {start_timeout_s} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield server
    finally:
        server.stop()
