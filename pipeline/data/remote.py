"""Object storage (s3://, gs://, http(s)://, any URL fsspec knows): reads with retries, writes, one-line errors.

Every remote byte the data path reads goes through `read_range` (a range GET: S3's `Range: bytes=a-b`,
fsspec's `cat_file(path, start, end)`), so a stream reads exactly the bytes of its piece of a shard and a
transient failure (a dropped connection, a timeout, a 5xx, a store restarting) is retried with exponential
backoff (tenacity: RETRY_ATTEMPTS attempts, about 4 s of waits in all) before the read counts as failed.
The lower layers' own retries are turned off for S3 (botocore `total_max_attempts=1`, s3fs `retries=1`),
so this is the one retry policy, and a wrong endpoint fails within seconds instead of minutes.

Where the endpoint and credentials come from: the standard AWS chain, read by botocore itself:
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an S3-compatible store, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), `AWS_PROFILE` and `~/.aws/config` / `~/.aws/credentials`,
or an instance role. None of them is copied into a config, a log line or MLflow: the filesystem is
built from the environment, and messages name the variables, never their values (the endpoint URL,
which is no secret, excepted).

Failures that retrying cannot fix (a missing bucket, no credentials, access denied, an endpoint that
does not answer) raise `RemoteError`, a DataError (so training exits 2) and an OSError (so a shard read
that meets one counts as a failed read), with one line that says what to set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import fsspec
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from pipeline.data.report import DataError

log = logging.getLogger("pipeline.data.remote")

RETRY_ATTEMPTS = 5  # attempts per request before a read counts as failed
RETRY_INITIAL_S, RETRY_MAX_S = 0.25, 4.0  # exponential backoff between attempts (plus up to 0.25 s jitter)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 60  # botocore's, per connection attempt / per socket read

# what identifies the credentials and endpoint a filesystem was built with (hashed into the cache key)
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE")
_FILESYSTEMS: dict[tuple[int, str, str], Any] = {}


class RemoteError(DataError, OSError):
    """Object storage cannot be read (or written) as configured; the message says what to set."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _env_key() -> str:
    return hashlib.sha256("\0".join(os.environ.get(k, "") for k in _AWS_ENV).encode()).hexdigest()


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a remote URL: one filesystem per process, protocol and AWS
    environment (a forked DataLoader worker builds its own; a changed endpoint or key gets a new one)."""
    proto = protocol(url)
    key = (os.getpid(), proto, _env_key())
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        options: dict[str, Any] = {"skip_instance_cache": True}
        if proto in ("s3", "s3a"):
            options["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                                        "retries": {"total_max_attempts": 1, "mode": "standard"}}
        fs = fsspec.filesystem(proto, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retry loop: ours (tenacity) is the one policy
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(url)


def endpoint(url: str) -> str:
    """Where requests for `url` go, for a message (an endpoint URL is no secret; keys never appear)."""
    if protocol(url) in ("s3", "s3a"):
        found = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return found or "AWS's S3 endpoint (AWS_ENDPOINT_URL is not set)"
    return url.split("/", 3)[2] if "://" in url else url


def _code(exc: BaseException) -> str:
    """The S3 error code of an exception (s3fs keeps botocore's ClientError as the cause), or ""."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _botocore_kind(exc: BaseException) -> str:
    names = {c.__name__ for c in type(exc).__mro__}
    for kind in ("NoCredentialsError", "PartialCredentialsError", "EndpointConnectionError",
                 "ConnectTimeoutError", "NoRegionError", "InvalidEndpointConfigurationError"):
        if kind in names:
            return kind
    return ""


def explain(exc: BaseException, url: str) -> str | None:
    """One line saying what to set, for a failure retrying cannot fix; None for anything else."""
    kind, code = _botocore_kind(exc), _code(exc)
    where = endpoint(url)
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                "~/.aws/credentials, an instance role)")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError"):
        return (f"cannot reach the object store at {where} for {url} ({type(exc).__name__}); set "
                "AWS_ENDPOINT_URL to the store's address (for an S3-compatible store) or check the network")
    if kind in ("NoRegionError", "InvalidEndpointConfigurationError"):
        return f"{url}: {exc}; set AWS_DEFAULT_REGION (and AWS_ENDPOINT_URL for an S3-compatible store)"
    if code == "NoSuchBucket" or "specified bucket does not exist" in str(exc):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return (f"bucket {bucket!r} does not exist at {where} (for {url}); create it, fix the URL, or set "
                "AWS_ENDPOINT_URL to the store that holds it")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled",
                "ExpiredToken", "InvalidToken") or isinstance(exc, PermissionError):
        return (f"access to {url} denied at {where} ({code or type(exc).__name__}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy")
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: not for a missing object, a bad range, credentials or access."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, EOFError)):
        return False
    if _botocore_kind(exc) in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError",
                               "InvalidEndpointConfigurationError"):
        return False
    if explain(exc, "") is not None and _botocore_kind(exc) not in ("EndpointConnectionError", "ConnectTimeoutError"):
        return False  # a missing bucket, a denied key
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 22:  # InvalidRange, a bad argument
        return False
    return not isinstance(exc, (ValueError, TypeError, KeyError, NotImplementedError))


def _retrying(what: str, url: str, fn: Any) -> Any:
    """fn() with RETRY_ATTEMPTS attempts on transient errors; a failure retrying cannot fix raises RemoteError."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s %s failed (%s: %s); attempt %d of %d in %.1f s", what, url, type(exc).__name__,
                    str(exc).splitlines()[0][:200] if exc else "", state.attempt_number + 1, RETRY_ATTEMPTS,
                    state.upcoming_sleep)

    try:
        for attempt in Retrying(stop=stop_after_attempt(RETRY_ATTEMPTS), reraise=True,
                                wait=wait_exponential_jitter(multiplier=RETRY_INITIAL_S, max=RETRY_MAX_S, jitter=0.25),
                                retry=retry_if_exception(is_transient), before_sleep=before_sleep):
            with attempt:
                return fn()
    except Exception as exc:
        if (line := explain(exc, url)) is not None:  # a missing bucket too; a missing object stays FileNotFoundError
            raise RemoteError(line) from exc
        if isinstance(exc, OSError):
            raise
        raise OSError(f"{what} {url} failed after {RETRY_ATTEMPTS} attempts ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object; fewer where the object ends before `end` (b"" past its end)."""
    fs, path = filesystem(url)

    def get() -> bytes:
        try:
            return fs.cat_file(path, start=start, end=end)
        except OSError as exc:
            if getattr(exc, "errno", None) == 22 and _code(exc) == "InvalidRange":
                return b""  # S3 answers 416 for a range that starts at or after the object's end
            raise

    return _retrying(f"reading bytes {start}-{end - 1} of", url, get)


def read_bytes(url: str) -> bytes:
    """A whole (small) object: a manifest, an index. A missing object raises FileNotFoundError."""
    fs, path = filesystem(url)
    return _retrying("reading", url, lambda: fs.cat_file(path))


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(_retrying("reading the size of", url, lambda: fs.size(path)))


def listdir(url: str) -> list[str]:
    """Names of the objects directly under a prefix ([] when there are none)."""
    fs, path = filesystem(url)

    def ls() -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        except FileNotFoundError as exc:
            if _code(exc) == "NoSuchBucket" or "bucket does not exist" in str(exc):
                raise
            return []

    return _retrying("listing", url, ls)


def put_file(local: str, url: str) -> None:
    """Upload a local file, byte for byte (multipart for large ones)."""
    fs, path = filesystem(url)
    _retrying("writing", url, lambda: fs.put_file(local, path))


def remove(url: str) -> None:
    fs, path = filesystem(url)
    _retrying("removing", url, lambda: fs.rm_file(path))
