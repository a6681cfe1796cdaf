"""The checkpoint watcher: each complete checkpoint once, across restarts; incomplete ones ignored; the
stop condition shared with other watchers (their claims and records); a single-file ledger imported.
Claims themselves and several watcher processes: tests/test_watch_claims.py."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter

import pytest

from evaluation.errors import EvaluationError
from evaluation.evaluate import evaluate, main
from evaluation.watch import Claims, Ledger, StopReason, default_ledger, read_ledger, watch
from pipeline.cli import EXIT_PARTIAL
from tests.helpers.evaluation import mark_done, prepare_digits, tiny_config, training_run, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


FAST = ["eval.num_samples=8", "eval.bpd_split=''", "eval.kid_subsets=2"]


def _counting(calls: Counter, **kw):
    def fn(ckpt):
        calls[ckpt.name] += 1
        return evaluate(ckpt, FAST, **kw)

    return fn


def _never(ckpt):
    raise AssertionError(f"nothing to evaluate, yet asked for {ckpt}")


def test_each_checkpoint_once_across_a_restart_and_incomplete_ones_skipped(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = training_run(uri)
    cfg = tiny_config(digits, tmp_path / "run")
    kw = {"run_id": run_id, "tracking_uri": uri}
    write_checkpoint(cfg, 100, seed=1, **kw)
    write_checkpoint(cfg, 200, seed=2, **kw)
    write_checkpoint(cfg, 300, seed=3, complete=False, **kw)  # being written: .tmp-step-00000300
    calls: Counter = Counter()

    # first watcher: sees two complete checkpoints, ignores the temporary folder, then is "killed"
    stopped = watch(tmp_path / "run", _counting(calls), once=True)
    state = stopped.ledger
    assert stopped.reason is StopReason.ONCE
    assert sorted(state["checkpoints"]) == ["step-00000100", "step-00000200"]
    assert calls == Counter({"step-00000100": 1, "step-00000200": 1})

    # training goes on: step 300 completes, a folder without COMPLETE appears, training ends
    shutil.rmtree(tmp_path / "run" / ".tmp-step-00000300")
    write_checkpoint(cfg, 300, seed=3, **kw)
    broken = write_checkpoint(cfg, 400, seed=4, complete=False, **kw)
    broken.rename(tmp_path / "run" / "step-00000400")  # named like a checkpoint, but no COMPLETE marker
    mark_done(cfg, 300)

    # a restarted watcher: only step 300 is new; it stops by itself once TRAINING_DONE is there
    reported: list = []
    stopped = watch(tmp_path / "run", _counting(calls), report_fn=reported.append, poll_s=0.05)
    state = stopped.ledger
    assert stopped.reason is StopReason.DONE
    assert [r.step for r in reported] == [300]
    assert calls == Counter({"step-00000100": 1, "step-00000200": 1, "step-00000300": 1})
    assert sorted(state["checkpoints"]) == ["step-00000100", "step-00000200", "step-00000300"]
    assert all(e["status"] == "ok" and e["run_id"] == run_id for e in state["checkpoints"].values())
    assert read_ledger(default_ledger(tmp_path / "run")) == json.loads(json.dumps(state))

    hist = MlflowClient(uri).get_metric_history(run_id, "eval/fid_digits")
    assert sorted(m.step for m in hist) == [100, 200, 300]
    by_step = {m.step: m.value for m in hist}
    assert by_step[300] == pytest.approx(state["checkpoints"]["step-00000300"]["metrics"]["eval/fid_digits"])

    # a third start has nothing to do and returns at once
    assert watch(tmp_path / "run", _counting(calls), poll_s=0.05).ledger == state
    assert sum(calls.values()) == 3


def test_checkpoint_removed_by_keep_k_is_skipped_and_real_errors_stop(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run")
    first = write_checkpoint(cfg, 10, seed=1)
    write_checkpoint(cfg, 20, seed=2)
    mark_done(cfg, 20)

    def deleted_first(ckpt):
        if ckpt == first:
            shutil.rmtree(first)  # the trainer's keep-k got there first
        return evaluate(ckpt, FAST, log_to_run=False)

    state = watch(tmp_path / "run", deleted_first, poll_s=0.05).ledger
    assert state["checkpoints"]["step-00000010"]["status"] == "skipped"
    assert state["checkpoints"]["step-00000020"]["status"] == "ok"

    write_checkpoint(cfg, 30, seed=3)
    with pytest.raises(EvaluationError):  # a setting that cannot work stops the watcher, unrecorded
        watch(tmp_path / "run", lambda c: (_ for _ in ()).throw(EvaluationError("bad setting")), once=True)
    assert "step-00000030" not in read_ledger(default_ledger(tmp_path / "run"))["checkpoints"]
    assert not list(Ledger(default_ledger(tmp_path / "run")).claims_dir.iterdir())  # released: others may retry


def test_watch_gives_up_after_max_wait_without_training_done(digits, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    stopped = watch(tmp_path / "run", _never, poll_s=0.05, max_wait_s=0.2)
    assert stopped.reason is StopReason.GAVE_UP
    state = stopped.ledger
    assert state["checkpoints"] == {}
    # the command says so in its exit status; with TRAINING_DONE there the same call succeeds
    args = ["--watch", str(tmp_path / "run"), "--poll-s", "0.05", "--max-wait-s", "0.2", *FAST]
    assert main(args) == EXIT_PARTIAL == 3
    assert "the watcher stopped before" in capsys.readouterr().err
    (tmp_path / "run" / "TRAINING_DONE").write_text("")
    assert main(args) == 0
    assert main(["--watch", str(tmp_path / "never"), "--poll-s", "0.05", "--max-wait-s", "0.2"]) == 2


def test_watcher_started_before_the_training_waits_for_its_folder(digits, tmp_path, capsys):
    # sbatch --dependency=after:TRAIN starts the watcher as soon as the training job starts, before the
    # trainer has created train.out_dir: the watcher waits for it instead of failing.
    cfg = tiny_config(digits, tmp_path / "run")
    calls: Counter = Counter()

    def training():
        write_checkpoint(cfg, 100, seed=1)
        mark_done(cfg, 100)

    timer = threading.Timer(0.5, training)
    timer.start()
    try:
        state = watch(tmp_path / "run", _counting(calls, log_to_run=False), poll_s=0.05, max_wait_s=60).ledger
    finally:
        timer.join()
    assert calls == Counter({"step-00000100": 1}) and state["checkpoints"]["step-00000100"]["status"] == "ok"
    assert f"waiting for {tmp_path / 'run'} to appear" in capsys.readouterr().err


def test_watcher_folder_that_never_appears_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="did not appear within 0 s; give the training's train.out_dir"):
        watch(tmp_path / "typo", _never, poll_s=0.05, max_wait_s=0.2)
    with pytest.raises(EvaluationError, match="no such folder"):
        watch(tmp_path / "typo", _never, once=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(EvaluationError, match="not a folder"):
        watch(tmp_path / "file", _never, max_wait_s=0.2)


def test_a_checkpoint_claimed_by_a_live_watcher_is_waited_for_not_evaluated(digits, tmp_path, capsys):
    cfg = tiny_config(digits, tmp_path / "run")
    write_checkpoint(cfg, 100, seed=1)
    write_checkpoint(cfg, 200, seed=2)
    mark_done(cfg, 200)
    book = Ledger(default_ledger(tmp_path / "run"))
    other = Claims(book.claims_dir, stale_s=0.5).acquire("step-00000200")  # heartbeating: alive
    calls: Counter = Counter()
    try:
        # TRAINING_DONE is there, but step 200 is someone else's: wait for it, bounded by max_wait_s
        stopped = watch(tmp_path / "run", _counting(calls, log_to_run=False), poll_s=0.05, max_wait_s=1.5,
                        claim_stale_s=0.5)
        assert stopped.reason is StopReason.GAVE_UP and stopped.training_done
        assert stopped.waiting_on == ["step-00000200"] and sorted(stopped.ledger["checkpoints"]) == ["step-00000100"]
        assert calls == Counter({"step-00000100": 1})
        assert "1 are still claimed by other watchers (step-00000200)" in capsys.readouterr().err
        args = ["--watch", str(tmp_path / "run"), "--poll-s", "0.05", "--max-wait-s", "0.3", "--claim-stale-s", "0.5"]
        assert main(args) == EXIT_PARTIAL
        assert "while other watchers still held step-00000200" in capsys.readouterr().err

        # the other watcher records it while this one waits: done, without evaluating it here
        def other_finishes():
            book.record("step-00000200", {"status": "ok", "step": 200, "metrics": {}, "run_id": None})
            other.release()

        timer = threading.Timer(0.5, other_finishes)
        timer.start()
        try:
            stopped = watch(tmp_path / "run", _counting(calls), poll_s=0.05, max_wait_s=30, claim_stale_s=0.5)
        finally:
            timer.join()
        assert stopped.reason is StopReason.DONE and calls == Counter({"step-00000100": 1})
        assert sorted(read_ledger(default_ledger(tmp_path / "run"))["checkpoints"]) == ["step-00000100", "step-00000200"]
    finally:
        other.release()


def test_a_single_file_ledger_of_an_older_watcher_is_imported(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run")
    write_checkpoint(cfg, 100, seed=1)
    write_checkpoint(cfg, 200, seed=2)
    old = {"evaluated_at": "2024-01-01T00:00:00+0000", "status": "ok", "step": 100, "metrics": {"eval/fid_digits": 1.0},
           "run_id": None}  # fmt: skip
    ledger = default_ledger(tmp_path / "run")
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"format": 1, "checkpoints": {"step-00000100": old}}))
    assert read_ledger(ledger)["checkpoints"] == {"step-00000100": old}  # read as it is, before any import
    calls: Counter = Counter()
    state = watch(tmp_path / "run", _counting(calls, log_to_run=False), once=True).ledger
    assert calls == Counter({"step-00000200": 1})
    assert state["checkpoints"]["step-00000100"] == old
    assert json.loads((ledger.with_suffix(".d") / "done" / "step-00000100.json").read_text()) == old
    assert json.loads(ledger.read_text()) == {"format": 2, "checkpoints": state["checkpoints"]}
    ledger.write_text(json.dumps({"format": 7, "checkpoints": {}}))
    with pytest.raises(EvaluationError, match="has format 7, expected 1 or 2"):
        watch(tmp_path / "run", _never, once=True)
