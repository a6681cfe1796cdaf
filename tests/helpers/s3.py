"""A real S3-compatible server on 127.0.0.1 for the tests: moto's standalone server, in a subprocess.

    from tests.helpers.s3 import s3_server  # noqa: F401  (provides the session fixture `s3_server`)

    def test_x(s3_server, monkeypatch):
        for k, v in s3_server.env().items():
            monkeypatch.setenv(k, v)          # what a user sets: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        s3_server.make_bucket("data")
        s3_server.upload_folder(local_dir, "s3://data/digits")

`python -m moto.server -H 127.0.0.1 -p PORT` runs in a process of its own (its objects live in that
process's memory), started once per test session and stopped when the session ends, also when a test
failed; every wait is bounded. `FlakyProxy` sits in front of it and drops the first connections, for the
retry tests (a real fault on a real socket, not a mock).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"
ACCESS_KEY = "ddpm-test-access-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_aws_env(endpoint: str, secret: str) -> dict[str, str]:
    """The standard AWS variables for a client of `endpoint`, and none of the developer's own settings:
    no profile, no ~/.aws files, no instance-metadata lookup (which waits for a timeout off EC2)."""
    return {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


AWS_VARIABLES_TO_CLEAR = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                          "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    port: int
    log: Path
    secret: str  # a fresh random secret key: tests check it never reaches a log or MLflow
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """AWS_* variables pointing a client at this server (or at `endpoint`, e.g. a proxy in front of it)."""
        return isolated_aws_env(endpoint or self.endpoint, self.secret)

    def client(self, endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=self.secret,
                            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))

    def make_bucket(self, name: str) -> str:
        with contextlib.suppress(self.client().exceptions.BucketAlreadyOwnedByYou):
            self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, local: str | os.PathLike, url: str) -> str:
        """Copy every file of a local folder to s3://bucket/prefix/<name>, byte for byte."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.make_bucket(bucket)
        client = self.client()
        for p in sorted(Path(local).iterdir()):
            if p.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{p.name}".lstrip("/"), Body=p.read_bytes())
        return url

    def get(self, url: str) -> bytes:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, url: str) -> list[str]:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        out = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        return sorted(o["Key"].rsplit("/", 1)[-1] for o in out.get("Contents", []))

    def put(self, url: str, data: bytes) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_s3_server(folder: Path, timeout_s: float = 60) -> S3Server:
    """`python -m moto.server` on a free port of 127.0.0.1; returns once it answers S3 requests."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "moto.log"
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port, log=log, secret=secrets.token_hex(16))
    with open(log, "ab") as out:
        server.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "MOTO_PORT": str(port)})
    deadline = time.monotonic() + timeout_s
    try:
        while not _listening(port):
            if server.proc.poll() is not None:
                raise RuntimeError(f"moto.server exited with {server.proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto.server not listening on 127.0.0.1:{port} after {timeout_s:.0f} s:\n"
                                   f"{log.read_text()[-2000:]}")
            time.sleep(0.1)
        server.client().list_buckets()  # answers S3, not just the socket
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def aws_env(server: S3Server, monkeypatch, endpoint: str | None = None) -> Iterator[dict[str, str]]:
    """Set the server's AWS_* variables in this process (and clear the developer's own)."""
    for k in AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(k, raising=False)
    env = server.env(endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 that closes its first `drop` connections after reading the request, without
    an answer (a load balancer restarting, a dropped connection), then forwards every later one; with
    `delay_s`, each request waits that long before it is passed on (a far-away store's round trip)."""

    def __init__(self, target_port: int, drop: int = 0, delay_s: float = 0.0):
        self.target_port, self.drop, self.delay_s = target_port, drop, delay_s
        self.dropped = self.forwarded = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                drop = self.dropped < self.drop
                if drop:
                    self.dropped += 1
                else:
                    self.forwarded += 1
            threading.Thread(target=self._handle, args=(conn, drop), daemon=True).start()

    def _handle(self, conn: socket.socket, drop: bool) -> None:
        with conn:
            if drop:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # the request's first bytes, then the connection closes unanswered
                return
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.target_port), 5) as up:
                pipes = [threading.Thread(target=_pump, args=(conn, up, self.delay_s), daemon=True),
                         threading.Thread(target=_pump, args=(up, conn), daemon=True)]
                for t in pipes:
                    t.start()
                for t in pipes:
                    t.join(120)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _pump(src: socket.socket, dst: socket.socket, delay_s: float = 0.0) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            if delay_s:
                time.sleep(delay_s)
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
