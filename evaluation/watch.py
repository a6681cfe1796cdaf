"""Watch a training out_dir; evaluate each new complete checkpoint exactly once, with any number of watchers.

    python -m evaluation.evaluate --watch runs/digits --poll-s 30 eval.feature_extractor=digits

A checkpoint is ready when its ``step-NNNNNNNN`` folder has the ``COMPLETE`` marker (the trainer writes
``.tmp-step-*`` and renames it when done); anything else is ignored until it is. The watcher stops once
``TRAINING_DONE`` exists and every complete checkpoint has a record. It only reads the training folder's
checkpoints (and writes its records and figures under ``<out_dir>/eval/``), so training never waits for
it. A checkpoint deleted by keep-k before its turn is recorded as skipped. Started before the training has
created its out_dir (``sbatch --dependency=after:TRAIN``), it waits for the folder (``--max-wait-s``
bounds that wait too). How a checkpoint is evaluated and reported is the caller's (``evaluate_fn``,
``report_fn``; evaluation.evaluate's ``--watch`` passes its evaluator), so this module does not import
the evaluator; ``watch`` returns why it stopped.

Several watchers (processes, or hosts sharing the file system) may watch one out_dir; each checkpoint is
still evaluated and reported once (docs/fid.md, "Several watchers"). Beside the ledger file
``eval/ledger.json`` lies its folder ``eval/ledger.d/``:

    claims/step-NNNNNNNN.claim   who evaluates it now: {host, pid, token, started}; created with O_EXCL, so
                                 one watcher gets it; its owner sets its mtime every stale_s / 6 (heartbeat)
    done/step-NNNNNNNN.json      the record of a finished checkpoint, written (tmp + rename) by the claim's
                                 owner before it releases the claim; the ledger is the set of these files

A claim whose mtime is older than ``stale_s`` (its owner was killed) is taken over: renamed to a name of
the taker's own (one rename of a file succeeds), checked to be the file judged stale, then created anew
with O_EXCL. An owner checks that the claim still holds its token (and that no record exists) before it
reports, and reports nothing otherwise. ``ledger.json`` is a summary rebuilt from ``done/`` after each
record; a ledger of format 1 (one file, written by watchers before claims) is imported into ``done/``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evaluation.errors import EvaluationError
from pipeline.checkpoint.folder import DONE, complete_checkpoints
from pipeline.files import JSON_MAX_BYTES, parse_json, read_json

LEDGER_FORMAT = 2  # the summary of done/; format 1 was the single-file ledger, imported on start
LEGACY_LEDGER_FORMAT = 1
DEFAULT_CLAIM_STALE_S = 60.0
HEARTBEATS_PER_STALE = 6  # beats within the stale bound: a few missed or late beats never look like a death
HOST = socket.gethostname()


class Evaluated(Protocol):
    """What ``evaluate_fn`` returns, as far as the ledger is concerned (evaluation.evaluate.EvalResult)."""

    step: int
    metrics: dict[str, float]
    logged_to_run: str | None


class StopReason(enum.Enum):
    DONE = "done"  # TRAINING_DONE was there and every complete checkpoint has a record
    GAVE_UP = "gave_up"  # max_wait_s passed with no new record (no TRAINING_DONE, or others' claims unfinished)
    ONCE = "once"  # once=True: one scan


@dataclass
class WatchResult:
    reason: StopReason
    ledger: dict[str, Any]
    training_done: bool = False  # TRAINING_DONE was there at the last scan
    waiting_on: list[str] = field(default_factory=list)  # complete checkpoints without a record (claimed by others)


def default_ledger(out_dir: str | Path) -> Path:
    return Path(out_dir) / "eval" / "ledger.json"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_atomic(path: Path, text: str) -> None:
    """tmp + fsync + rename: readers see the old file or the new one. mkstemp's name is unique (O_EXCL)
    on a shared file system too, so concurrent writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the records from other users of a shared out_dir
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------ the ledger


class Ledger:
    """The records of evaluated checkpoints: ``<ledger>.d/done/<checkpoint>.json``, one file each, written
    only by the owner of the checkpoint's claim, so concurrent watchers never overwrite each other's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder = self.path.with_suffix(".d")
        self.done_dir = self.folder / "done"
        self.claims_dir = self.folder / "claims"

    def open(self) -> None:
        """Validate ledger.json, create done/, import a format-1 ledger's entries."""
        legacy = _read_summary(self.path)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        if legacy is not None and legacy["format"] == LEGACY_LEDGER_FORMAT:
            # written before claims existed: its entries are done checkpoints. Concurrent importers write
            # the same records; the format-2 summary written next ends the import.
            done = self.entries()
            for name, entry in legacy["checkpoints"].items():
                if name not in done:
                    self.record(name, entry)
            self.write_summary()

    def has(self, name: str) -> bool:
        return (self.done_dir / f"{name}.json").is_file()

    def entries(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted(self.done_dir.glob("step-*.json")):
            try:
                out[p.stem] = read_json(p, max_bytes=JSON_MAX_BYTES, what="ledger record")
            except FileNotFoundError:
                continue  # deleted by hand (to re-evaluate it) after the listing
            except ValueError as exc:
                raise EvaluationError(f"ledger record {p} is not valid JSON ({exc}); delete it to re-evaluate "
                                      f"{p.stem}") from exc
        return out

    def record(self, name: str, entry: dict[str, Any]) -> None:
        _write_atomic(self.done_dir / f"{name}.json", json.dumps(entry, indent=1, sort_keys=True))

    def snapshot(self) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "checkpoints": self.entries()}

    def write_summary(self) -> dict[str, Any]:
        """Rebuild ledger.json from the records; a concurrent rebuild may land last with one record fewer,
        but every watcher rebuilds it again when it stops, after it has seen every record."""
        state = self.snapshot()
        _write_atomic(self.path, json.dumps(state, indent=1, sort_keys=True))
        return state


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ledger = read_json(path, max_bytes=JSON_MAX_BYTES, what="ledger")
    except ValueError as exc:
        raise EvaluationError(f"ledger {path} is not valid JSON ({exc}); delete it (the records in "
                              f"{path.with_suffix('.d')}/done/ are kept) or give another --ledger") from exc
    if not isinstance(ledger, dict) or ledger.get("format") not in (LEGACY_LEDGER_FORMAT, LEDGER_FORMAT):
        found = ledger.get("format") if isinstance(ledger, dict) else type(ledger).__name__
        raise EvaluationError(f"ledger {path} has format {found!r}, expected {LEGACY_LEDGER_FORMAT} or "
                              f"{LEDGER_FORMAT}; is it a ledger of this watcher?")
    return ledger


def read_ledger(path: str | Path) -> dict[str, Any]:
    """The ledger's records (done/), with those of a format-1 ledger.json not yet imported."""
    ledger = Ledger(path)
    legacy = _read_summary(ledger.path)
    entries = dict(legacy["checkpoints"]) if legacy and legacy["format"] == LEGACY_LEDGER_FORMAT else {}
    if ledger.done_dir.is_dir():
        entries.update(ledger.entries())
    return {"format": LEDGER_FORMAT, "checkpoints": entries}


# ------------------------------------------------------------------------------------------ the claims


@dataclass(frozen=True)
class ClaimFile:
    """One look at a claim file: which file (inode), its heartbeat (mtime) and content."""

    ino: int
    mtime_ns: int
    info: dict[str, Any]

    @property
    def token(self) -> str:
        return str(self.info.get("token", ""))

    def age_s(self) -> float:
        return time.time() - self.mtime_ns / 1e9

    def owner(self) -> str:
        return f"{self.info.get('host', '?')} pid {self.info.get('pid', '?')}"


def look(path: Path) -> ClaimFile | None:
    """The claim at ``path``, or None. open() + fstat, not stat(): on NFS, open revalidates the cached
    attributes (close-to-open consistency), so the mtime is the owner's latest heartbeat."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        info = parse_json(raw, max_bytes=len(raw), what="claim", where=path)
    except ValueError:
        info = {}  # created, not yet written (or its creator was killed in between): judged by its mtime
    return ClaimFile(st.st_ino, st.st_mtime_ns, info if isinstance(info, dict) else {})


def _move_aside(path: Path, expected: ClaimFile, tag: str) -> bool:
    """Remove the claim file ``expected`` from ``path``, but no other: the rename is atomic, yet what it moves
    may have been replaced since ``expected`` was seen. Returns whether it was removed."""
    aside = path.with_name(f"{path.name}.{tag}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # someone else moved it first
    moved = look(aside)
    if moved is not None and (moved.ino, moved.mtime_ns, moved.token) == (
            expected.ino, expected.mtime_ns, expected.token):
        os.unlink(aside)
        return True
    # a newer claim (or the owner beat meanwhile): put it back, never over a claim created since (link
    # fails on an existing name); if one was, the claim moved here is lost and its owner will notice
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    os.unlink(aside)
    return False


class Claim:
    """A claim this process holds. A daemon thread refreshes its heartbeat while it is held and marks it lost
    as soon as the file no longer carries its token (taken over after it looked stale to another watcher)."""

    def __init__(self, path: Path, token: str, heartbeat_s: float):
        self.path = path
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat-{path.stem}", daemon=True)

    def start(self) -> Claim:
        self.touch()
        self._thread.start()
        return self

    def touch(self) -> None:
        """Heartbeat: the mtime, set from this host's clock (readers compare it with theirs)."""
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):  # moved aside just now: the next check tells whose it is
            os.utime(self.path, ns=(now, now))

    def held(self) -> bool:
        """Whether the claim file still carries this claim's token. A missing file is looked at a few times:
        a taker that moved it aside by mistake puts it back within milliseconds."""
        if self.lost:
            return False
        for _ in range(3):
            seen = look(self.path)
            if seen is not None:
                break
            time.sleep(0.05)
        if seen is None or seen.token != self.token:
            self.lost = True
        return not self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.held():
                return
            self.touch()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        seen = look(self.path)
        if seen is not None and seen.token == self.token:
            _move_aside(self.path, seen, f"released-{self.token}")


class Claims:
    """The claims folder of one ledger. ``acquire(name)``: this process's claim on checkpoint ``name``, or
    None while another live watcher holds it."""

    def __init__(self, folder: str | Path, stale_s: float = DEFAULT_CLAIM_STALE_S):
        if stale_s <= 0:
            raise EvaluationError(f"--claim-stale-s {stale_s}: must be > 0 (seconds without a heartbeat after "
                                  f"which another watcher takes a claim over; default {DEFAULT_CLAIM_STALE_S:.0f})")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stale_s = stale_s
        self.heartbeat_s = stale_s / HEARTBEATS_PER_STALE

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    def acquire(self, name: str) -> Claim | None:
        path = self.path(name)
        claim = self._create(path)
        if claim is not None:
            return claim
        seen = look(path)
        if seen is None:  # released between our create and our look
            return self._create(path)
        if seen.age_s() <= self.stale_s:
            return None
        token = uuid.uuid4().hex
        if not _move_aside(path, seen, f"stale-{token}"):
            return None  # another watcher took it over first, or its owner beat meanwhile
        claim = self._create(path, token)  # None: a watcher that found the name free just now has it
        if claim is not None:
            print(f"watch: took over the claim on {name} of {seen.owner()} (no heartbeat for {seen.age_s():.0f} s "
                  f"> --claim-stale-s {self.stale_s:g}: killed?)", file=sys.stderr, flush=True)
        return claim

    def _create(self, path: Path, token: str = "") -> Claim | None:
        token = token or uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        info = {"host": HOST, "pid": os.getpid(), "token": token, "started": _now_iso()}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return Claim(path, token, self.heartbeat_s).start()


# ----------------------------------------------------------------------------------------- the watcher


def pending(out_dir: str | Path, ledger: Ledger) -> list[Path]:
    """Complete checkpoints without a record, oldest first."""
    return [p for p in complete_checkpoints(out_dir) if not ledger.has(p.name)]


def _evaluate_claimed(ckpt: Path, claim: Claim, ledger: Ledger, evaluate_fn: Callable[[Path], Evaluated],
                      report_fn: Callable[[Evaluated], None] | None) -> dict[str, Any] | None:
    """Evaluate ``ckpt`` under ``claim`` and report it; the entry to record, or None when the claim was lost."""
    entry: dict[str, Any] = {"evaluated_at": _now_iso(), "evaluated_by": f"{HOST} pid {os.getpid()}"}
    result = None
    try:
        result = evaluate_fn(ckpt)
    except Exception as exc:
        if ckpt.exists():
            raise  # a real problem (settings, weights): stop and say so rather than mark it done
        # keep-k removed it between the scan and the read of its weights
        entry.update(status="skipped", reason=f"removed before evaluation ({type(exc).__name__})")
    # the last check before anything leaves this process: a watcher that took the claim over evaluates too
    if not claim.held() or ledger.has(ckpt.name):
        print(f"watch: lost the claim on {ckpt.name} to another watcher (no heartbeat seen for --claim-stale-s: "
              "was this process stopped or its file system stalled?); its result is not reported",
              file=sys.stderr, flush=True)
        return None
    if result is None:
        print(f"watch: {ckpt.name} was removed before it could be evaluated; skipped", file=sys.stderr)
        return entry
    if report_fn is not None:
        report_fn(result)
    entry.update(status="ok", step=result.step, metrics=result.metrics, run_id=result.logged_to_run)
    return entry


def watch(
    out_dir: str | Path,
    evaluate_fn: Callable[[Path], Evaluated],
    *,
    report_fn: Callable[[Evaluated], None] | None = None,
    poll_s: float = 60.0,
    ledger: str | Path = "",
    once: bool = False,
    max_wait_s: float = 0.0,
    claim_stale_s: float = DEFAULT_CLAIM_STALE_S,
) -> WatchResult:
    """Evaluate new checkpoints with ``evaluate_fn(ckpt)`` until training is done and all are evaluated.

    ``report_fn(result)`` publishes each result (it may fill in ``result.logged_to_run``); it is called
    only while this watcher's claim on the checkpoint holds, so ``evaluate_fn`` should not publish.
    ``once``: one scan, then return. ``max_wait_s`` (> 0): give up after this long without a new record
    (by any watcher). ``claim_stale_s``: take over a claim whose heartbeat is older. Raises EvaluationError
    for a folder that is not (or never becomes) a training out_dir, or an unreadable ledger; returns why it
    stopped, with the ledger.
    """
    out_dir = Path(out_dir)
    last_progress = time.monotonic()
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluationError(f"--watch {out_dir}: not a folder; give the training's train.out_dir")
    if not out_dir.is_dir():
        # Submitted with the training (sbatch --dependency=after:TRAIN), the watcher can start before the
        # trainer has created its out_dir: wait for it, bounded by max_wait_s like any other wait.
        if once:
            raise EvaluationError(f"--watch {out_dir}: no such folder; give the training's train.out_dir")
        print(f"watch: waiting for {out_dir} to appear (the train.out_dir of a training that has not started "
              "yet?)", file=sys.stderr, flush=True)
        while not out_dir.is_dir():
            if max_wait_s and time.monotonic() - last_progress > max_wait_s:
                raise EvaluationError(f"--watch {out_dir}: the folder did not appear within {max_wait_s:.0f} s; "
                                      "give the training's train.out_dir")
            time.sleep(poll_s)
    book = Ledger(ledger or default_ledger(out_dir))
    claims = Claims(book.claims_dir, claim_stale_s)
    book.open()
    recorded = set(book.entries())
    last_progress = time.monotonic()  # the folder's appearance counts as progress: each wait has its own bound
    while True:
        training_done = (out_dir / DONE).is_file()  # before the scan: a checkpoint written after it is seen next round
        for ckpt in pending(out_dir, book):
            claim = claims.acquire(ckpt.name)
            if claim is None:
                continue  # another watcher evaluates it; if that one dies, its claim goes stale and is taken over
            try:
                # recorded between our scan and our claim (its owner released it just before we looked)
                entry = None if book.has(ckpt.name) else _evaluate_claimed(ckpt, claim, book, evaluate_fn, report_fn)
                if entry is not None:
                    book.record(ckpt.name, entry)
                    book.write_summary()
            finally:
                claim.release()
        state = book.snapshot()
        if set(state["checkpoints"]) - recorded:  # this watcher's records or another's
            recorded = set(state["checkpoints"])
            last_progress = time.monotonic()
        if once:
            return WatchResult(StopReason.ONCE, book.write_summary(), training_done)
        left = [p.name for p in complete_checkpoints(out_dir) if p.name not in state["checkpoints"]]
        if training_done and not left:
            return WatchResult(StopReason.DONE, book.write_summary(), training_done)
        if max_wait_s and time.monotonic() - last_progress > max_wait_s:
            if training_done:
                print(f"watch: no checkpoint of {out_dir} was recorded for {max_wait_s:.0f} s; {len(left)} are still "
                      f"claimed by other watchers ({', '.join(left)}); stopping", file=sys.stderr)
            else:
                print(f"watch: nothing new in {out_dir} for {max_wait_s:.0f} s and no {DONE}; stopping",
                      file=sys.stderr)
            return WatchResult(StopReason.GAVE_UP, book.write_summary(), training_done, left)
        time.sleep(poll_s)
