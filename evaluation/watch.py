"""Watch a training out_dir and evaluate every new complete checkpoint exactly once.

    python -m evaluation.evaluate --watch runs/digits --poll-s 30 eval.feature_extractor=digits

A checkpoint is ready when its ``step-NNNNNNNN`` folder has the ``COMPLETE`` marker (the trainer writes
``.tmp-step-*`` and renames it when done); anything else is ignored until it is. Done steps are kept in a
ledger (JSON, replaced atomically after each evaluation), so a restarted watcher skips them. The watcher
stops once ``TRAINING_DONE`` exists and every complete checkpoint is in the ledger. It only reads the
training folder's checkpoints (and writes its ledger and figures under ``<out_dir>/eval/``), so training
never waits for it. A checkpoint deleted by keep-k before its turn is recorded as skipped. Started before
the training has created its out_dir (``sbatch --dependency=after:TRAIN``), it waits for the folder
(``--max-wait-s`` bounds that wait too). How a checkpoint is evaluated and reported is the caller's
(``evaluate_fn``, ``report_fn``; evaluation.evaluate's ``--watch`` passes its evaluator), so this module
does not import the evaluator; ``watch`` returns why it stopped.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from evaluation.errors import EvaluationError
from pipeline.checkpoint import DONE, complete_checkpoints

LEDGER_FORMAT = 1


class Evaluated(Protocol):
    """What ``evaluate_fn`` returns, as far as the ledger is concerned (evaluation.evaluate.EvalResult)."""

    step: int
    metrics: dict[str, float]
    logged_to_run: str | None


class StopReason(enum.Enum):
    DONE = "done"  # TRAINING_DONE was there and every complete checkpoint is in the ledger
    GAVE_UP = "gave_up"  # max_wait_s passed with nothing new and no TRAINING_DONE
    ONCE = "once"  # once=True: one scan


@dataclass
class WatchResult:
    reason: StopReason
    ledger: dict[str, Any]


def default_ledger(out_dir: str | Path) -> Path:
    return Path(out_dir) / "eval" / "ledger.json"


def read_ledger(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {"format": LEDGER_FORMAT, "checkpoints": {}}
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"ledger {path} is not valid JSON ({exc}); delete it to re-evaluate every checkpoint") from exc
    if ledger.get("format") != LEDGER_FORMAT:
        raise EvaluationError(f"ledger {path} has format {ledger.get('format')!r}, expected {LEDGER_FORMAT}")
    return ledger


def write_ledger(path: str | Path, ledger: dict[str, Any]) -> None:
    """tmp + fsync + os.replace: a watcher killed mid-write leaves the previous ledger intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(ledger, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pending(out_dir: str | Path, ledger: dict[str, Any]) -> list[Path]:
    """Complete checkpoints not yet in the ledger, oldest first."""
    return [p for p in complete_checkpoints(out_dir) if p.name not in ledger["checkpoints"]]


def watch(
    out_dir: str | Path,
    evaluate_fn: Callable[[Path], Evaluated],
    *,
    report_fn: Callable[[Evaluated], None] | None = None,
    poll_s: float = 60.0,
    ledger: str | Path = "",
    once: bool = False,
    max_wait_s: float = 0.0,
) -> WatchResult:
    """Evaluate new checkpoints with ``evaluate_fn(ckpt)`` until training is done and all are evaluated.

    ``report_fn(result)`` is called after each evaluation. ``once``: one scan, then return. ``max_wait_s``
    (> 0): give up after this long without anything new. Raises EvaluationError for a folder that is not
    (or never becomes) a training out_dir, or an unreadable ledger; returns why it stopped, with the ledger.
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
    ledger_path = Path(ledger) if ledger else default_ledger(out_dir)
    state = read_ledger(ledger_path)
    last_progress = time.monotonic()  # the folder's appearance counts as progress: each wait has its own bound
    while True:
        done = (out_dir / DONE).is_file()  # read before the scan: a checkpoint written after it is seen next round
        for ckpt in pending(out_dir, state):
            entry: dict[str, Any] = {"evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                result = evaluate_fn(ckpt)
            except Exception as exc:
                if ckpt.exists():
                    raise  # a real problem (settings, weights): stop and say so rather than mark it done
                # keep-k removed it between the scan and the read of its weights
                entry.update(status="skipped", reason=f"removed before evaluation ({type(exc).__name__})")
                print(f"watch: {ckpt.name} was removed before it could be evaluated; skipped", file=sys.stderr)
            else:
                entry.update(status="ok", step=result.step, metrics=result.metrics, run_id=result.logged_to_run)
                if report_fn is not None:
                    report_fn(result)
            state["checkpoints"][ckpt.name] = entry
            write_ledger(ledger_path, state)
            last_progress = time.monotonic()
        if once:
            return WatchResult(StopReason.ONCE, state)
        if done and not pending(out_dir, state):
            return WatchResult(StopReason.DONE, state)
        if max_wait_s and time.monotonic() - last_progress > max_wait_s:
            print(f"watch: nothing new in {out_dir} for {max_wait_s:.0f} s and no {DONE}; stopping", file=sys.stderr)
            return WatchResult(StopReason.GAVE_UP, state)
        time.sleep(poll_s)
