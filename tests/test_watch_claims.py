"""Several watchers on one out_dir: per-checkpoint claims (O_EXCL, heartbeat, stale takeover, lost-claim
detection), with real processes and real files; and three `evaluate --watch` processes, one SIGKILLed
mid-evaluation, that still log each checkpoint's FID exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from evaluation.watch import ClaimFile, Claims, Ledger, _move_aside, default_ledger, look
from tests.helpers.evaluation import mark_done, prepare_digits, tiny_config, training_run, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# A watcher's claim side alone, in its own process: print "ready", acquire NAMES once GO exists, print
# what it got, wait for CHECK, print which claims still hold, release them (one JSON line each).
HOLDER = r"""
import json, os, sys, time
from evaluation.watch import Claims
folder, stale_s, go, check, *names = sys.argv[1:]
claims = Claims(folder, float(stale_s))
print(json.dumps("ready"), flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
got = {n: c for n in names if (c := claims.acquire(n)) is not None}
print(json.dumps({"acquired": {n: c.token for n, c in got.items()}}), flush=True)
while not os.path.exists(check):
    time.sleep(0.01)
print(json.dumps({"held": {n: c.held() for n, c in got.items()}}), flush=True)
for c in got.values():
    c.release()
"""


def _holder(folder: Path, stale_s: float, names: list[str], go: Path, check: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(stale_s), str(go), str(check), *names],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()  # "" when the holder died
    assert line, f"the holder printed nothing: {proc.communicate()}"
    return json.loads(line)


def _old_claim(path: Path, age_s: float, **info) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "gone", "pid": 1, "token": "t-dead", "started": "", **info}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_a_claim_is_exclusive_even_for_a_restart_with_the_same_host_and_pid(tmp_path):
    a, b = Claims(tmp_path, stale_s=30), Claims(tmp_path, stale_s=30)  # b: this process restarted
    mine = a.acquire("step-00000100")
    assert mine is not None
    info = json.loads(a.path("step-00000100").read_text())
    assert info["pid"] == os.getpid() and info["token"] == mine.token and info["host"] and info["started"]
    assert b.acquire("step-00000100") is None  # same host and pid, another token: not the same owner
    other = b.acquire("step-00000200")  # other checkpoints are free
    assert other is not None and mine.held()
    mine.release()
    other.release()
    assert not a.path("step-00000100").exists()
    again = b.acquire("step-00000100")
    assert again is not None and again.held()
    again.release()


def test_stale_claims_are_taken_over_also_an_empty_one_and_only_the_one_judged_stale(tmp_path, capsys):
    claims = Claims(tmp_path, stale_s=5)
    _old_claim(tmp_path / "step-00000001.claim", age_s=4)  # old, but within the bound: its owner lives
    assert claims.acquire("step-00000001") is None
    _old_claim(tmp_path / "step-00000002.claim", age_s=6)
    taken = [claims.acquire("step-00000002")]
    assert taken[0] is not None and look(taken[0].path).token == taken[0].token
    assert "took over the claim on step-00000002 of gone pid 1 (no heartbeat for 6 s" in capsys.readouterr().err
    # a creator killed between O_EXCL and writing leaves an empty claim: judged by its mtime alone
    empty = tmp_path / "step-00000003.claim"
    empty.write_text("")
    assert claims.acquire("step-00000003") is None
    os.utime(empty, (time.time() - 6,) * 2)
    taken.append(claims.acquire("step-00000003"))
    assert taken[1] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-0000000{i}.claim" for i in (1, 2, 3)]

    # a taker renames what is at the path; when that is not the claim it judged stale (taken over and
    # re-created meanwhile), it puts it back: same file, nothing else left behind
    path = tmp_path / "step-00000004.claim"
    _old_claim(path, age_s=60)
    judged = look(path)
    path.unlink()
    _old_claim(path, age_s=0, token="t-new")
    fresh = look(path)
    assert not _move_aside(path, judged, "stale-test")
    assert look(path) == fresh and not list(tmp_path.glob("*.stale-*"))
    assert not _move_aside(path, ClaimFile(fresh.ino, fresh.mtime_ns + 1, fresh.info), "stale-test")  # it beat
    assert look(path) == fresh
    for c in taken:
        c.release()


@pytest.mark.slow
def test_heartbeat_keeps_a_live_claim_and_a_killed_owner_s_claim_is_taken_over(tmp_path, capsys):
    go, check = tmp_path / "go", tmp_path / "check"
    go.touch()
    owner = _holder(tmp_path / "claims", 1.5, ["step-00000100"], go, check)
    try:
        assert _line(owner) == "ready"
        token = _line(owner)["acquired"]["step-00000100"]
        claims = Claims(tmp_path / "claims", stale_s=1.5)
        t_end = time.monotonic() + 3.5  # over two stale bounds: only the heartbeat keeps it
        while time.monotonic() < t_end:
            assert claims.acquire("step-00000100") is None
            time.sleep(0.1)
        assert look(claims.path("step-00000100")).token == token
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        killed_at = time.monotonic()
        taken = None
        while taken is None:
            assert time.monotonic() - killed_at < 10, "the dead owner's claim was never taken over"
            taken = claims.acquire("step-00000100")
            time.sleep(0.05)
        assert time.monotonic() - killed_at > 1.5 - 1.5 / 6  # not before the bound after the last heartbeat
        assert "took over the claim on step-00000100" in capsys.readouterr().err
        taken.release()
    finally:
        owner.kill()
        owner.communicate()


@pytest.mark.slow
def test_a_stopped_owner_notices_it_lost_the_claim_and_its_release_keeps_the_new_one(tmp_path):
    go, check = tmp_path / "go", tmp_path / "check"
    go.touch()
    owner = _holder(tmp_path / "claims", 1.0, ["step-00000100"], go, check)
    try:
        assert _line(owner) == "ready" and _line(owner)["acquired"]
        owner.send_signal(signal.SIGSTOP)  # a frozen process (or a stalled file system): no heartbeat
        claims = Claims(tmp_path / "claims", stale_s=1.0)
        deadline = time.monotonic() + 10
        while (taken := claims.acquire("step-00000100")) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        owner.send_signal(signal.SIGCONT)
        check.touch()
        assert _line(owner) == {"held": {"step-00000100": False}}
        assert owner.wait(timeout=30) == 0
        assert taken.held() and look(taken.path).token == taken.token  # the old owner's release left it
        taken.release()
    finally:
        owner.kill()
        owner.communicate()


@pytest.mark.slow
def test_concurrent_takeovers_of_the_same_stale_claims_leave_one_owner_each(tmp_path):
    names = [f"step-{i:08d}" for i in range(1, 31)]
    for n in names:
        _old_claim(tmp_path / "claims" / f"{n}.claim", age_s=120)
    go, check = tmp_path / "go", tmp_path / "check"
    procs = [_holder(tmp_path / "claims", 60, names, go, check) for _ in range(3)]
    try:
        assert [_line(p) for p in procs] == ["ready"] * 3
        go.touch()  # all at once, in the same order: each stale claim is raced for by three takers
        acquired = [_line(p)["acquired"] for p in procs]
        check.touch()
        held = [_line(p)["held"] for p in procs]
        for p in procs:
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    for n in names:
        owners = [i for i, h in enumerate(held) if h.get(n)]
        assert len(owners) == 1, (n, acquired, held)  # never two; a taker that raced may lose its claim at once
    assert sum(map(len, acquired)) >= len(names)
    assert not list((tmp_path / "claims").iterdir())  # every claim released, no renamed leftovers


# ----------------------------------------------------------------------- three real watcher processes


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


FAST = ["eval.num_samples=8", "eval.bpd_split=''", "eval.kid_subsets=2"]


def _watcher(out_dir: Path, log: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evaluation.evaluate", "--watch", str(out_dir), "--poll-s", "0.2",
           "--claim-stale-s", "3", "--max-wait-s", "120", *overrides]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


@pytest.mark.slow
def test_three_watchers_one_killed_mid_evaluation_log_each_fid_exactly_once(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = training_run(uri)
    out = tmp_path / "run"
    cfg = tiny_config(digits, out)
    steps = [100, 200, 300, 400, 500]
    for i, s in enumerate(steps[:4]):
        write_checkpoint(cfg, s, seed=i, run_id=run_id, tracking_uri=uri)
    ledger = Ledger(default_ledger(out))
    # the two others see the out_dir under another path (another host's mount point), which appears only
    # once the victim holds its claim: until then they wait for it, already started
    mount = tmp_path / "other-mount"
    mount.mkdir()
    procs = []
    try:
        # the victim samples a million images per checkpoint: it holds its first claim until it is killed
        victim = _watcher(out, tmp_path / "victim.log", ["eval.num_samples=1000000", *FAST[1:]])
        procs += [victim] + [_watcher(mount / "run", tmp_path / f"w{i}.log", FAST) for i in (1, 2)]

        def claims_of(pids: set[int]) -> list[str]:
            found = [(p.stem, look(p)) for p in ledger.claims_dir.glob("*.claim")] if ledger.claims_dir.is_dir() else []
            return [name for name, seen in found if seen is not None and seen.info.get("pid") in pids]

        [held] = _wait_for(lambda: claims_of({victim.pid}), 90, "the victim's claim")
        (mount / "run").symlink_to(out)
        others = {p.pid for p in procs[1:]}
        _wait_for(lambda: claims_of(others) or any(ledger.done_dir.iterdir()), 90, "the others at work")
        assert claims_of({victim.pid}) == [held] and victim.poll() is None  # killed while it holds the claim
        victim.send_signal(signal.SIGKILL)
        write_checkpoint(cfg, 500, seed=4, run_id=run_id, tracking_uri=uri)  # training goes on, then ends
        mark_done(cfg, 500)
        codes = [p.wait(timeout=150) for p in procs[1:]]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert codes == [0, 0], logs

    hist = MlflowClient(uri).get_metric_history(run_id, "eval/fid_digits")
    assert Counter(m.step for m in hist) == Counter(steps), logs  # each FID exactly once, at its step
    records = ledger.entries()
    assert sorted(records) == [f"step-{s:08d}" for s in steps]
    survivors = {f"pid {p.pid}" for p in procs[1:]}
    assert all(r["status"] == "ok" and r["run_id"] == run_id and r["evaluated_by"].split(" ", 1)[1] in survivors
               for r in records.values()), records
    assert {m.step: m.value for m in hist} == {r["step"]: r["metrics"]["eval/fid_digits"] for r in records.values()}
    # (a survivor starved of CPU for the stale bound may lose a claim too: safe, as the counts above show)
    takeovers = [line for text in logs.values() for line in text.splitlines()
                 if "took over the claim" in line and f"pid {victim.pid}" in line]
    assert len(takeovers) == 1 and f"on {held} of " in takeovers[0], logs
    assert not list(ledger.claims_dir.iterdir())  # released, the victim's moved aside and removed
    summary = json.loads(default_ledger(out).read_text())
    assert summary["format"] == 2 and summary["checkpoints"] == records
