"""Where the test suite's CPU goes: a pytest plugin that records, per test, its wall time, the CPU time of the
child processes it started and waited for (trainings, launches, servers: ``RUSAGE_CHILDREN``), the CPU time of
the pytest worker itself, and the processes it started; and a report that sums them per test file.

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -q -n 2 --dist loadfile -p suite_cpu     # writes /tmp/suite-cpu/
    .venv/bin/python benchmarks/suite_cpu.py /tmp/suite-cpu                                   # the table

Processes that SLURM's daemons start (the test cluster's jobs) are not children of pytest: their CPU is not seen.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import resource
import subprocess
import sys
import time

import pytest

OUT = os.environ.get("SUITE_CPU_DIR", "/tmp/suite-cpu")
_started: list[str] = []
_popen_init = subprocess.Popen.__init__


def _init(self, args, *a, **k):
    argv = [args] if isinstance(args, (str, bytes)) else list(args)
    _started.append(" ".join(os.path.basename(str(x)) for x in argv[:4]))
    return _popen_init(self, args, *a, **k)


subprocess.Popen.__init__ = _init


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _started.clear()
    c0, s0, t0 = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF), time.monotonic()
    yield
    rec = {"id": item.nodeid, "wall": time.monotonic() - t0, "child_cpu": _cpu(resource.RUSAGE_CHILDREN) - c0,
           "self_cpu": _cpu(resource.RUSAGE_SELF) - s0, "started": list(_started)}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"rec.{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def report(folder: str) -> str:
    recs = []
    for path in glob.glob(os.path.join(folder, "rec.*.jsonl")):
        with open(path) as f:
            recs += [json.loads(line) for line in f]
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for r in recs:
        row = files[r["id"].split("::")[0]]
        row[0] += r["wall"]
        row[1] += r["child_cpu"]
        row[2] += r["self_cpu"]
        row[3] += sum(not s.startswith(("scontrol", "sinfo")) for s in r["started"])
    lines = ["| test file | wall on its worker (s) | CPU of its child processes (s) | CPU in the worker (s) | "
             "processes started (scontrol polls aside) |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in sorted(files.items(), key=lambda kv: -kv[1][1] - kv[1][2]):
        lines.append(f"| {name} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} |")
    totals = [sum(row[i] for row in files.values()) for i in range(4)]
    lines.append(f"| **all {len(recs)} tests** | {totals[0]:.0f} | {totals[1]:.0f} | {totals[2]:.0f} | {totals[3]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else OUT))
