"""Where the test suite's time goes: pytest's ``--durations=0`` report summed per test file (setup, call and
teardown), for a before/after table.

    .venv/bin/python -m pytest -q --durations=0 ... > run.log     # the suite, with every test's durations
    .venv/bin/python benchmarks/suite_durations.py before.log after.log [--top 25]

Prints a Markdown table: per file the seconds in each log, largest first, and the totals (the sum of the test
durations; with two pytest workers the wall clock is less than that sum: it is the "in N s" of pytest's last line,
printed below the table).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+?)::")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*?) in ([\d.]+)s", re.M)


def per_file(log: str) -> tuple[dict[str, float], str, float]:
    """{test file: seconds} from a ``--durations=0`` report, the outcome line and its wall-clock seconds."""
    files: dict[str, float] = defaultdict(float)
    for m in (LINE.match(line) for line in log.splitlines()):
        if m:
            files[m.group(3)] += float(m.group(1))
    summaries = SUMMARY.findall(log)
    outcome, wall = summaries[-1] if summaries else ("?", "nan")
    return dict(files), outcome, float(wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="pytest outputs with --durations=0 (before, after, ...)")
    p.add_argument("--top", type=int, default=0, help="only the N largest files of the last log (0 = all)")
    args = p.parse_args()
    parsed = [per_file(path.read_text(errors="replace")) for path in args.logs]
    last = parsed[-1][0]
    names = sorted(set().union(*(f for f, _, _ in parsed)), key=lambda n: -last.get(n, 0.0))
    if args.top:
        names = names[: args.top]
    heads = [path.name for path in args.logs]
    print("| test file | " + " | ".join(f"{h} (s)" for h in heads) + " |")
    print("| --- |" + " ---: |" * len(heads))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{f.get(name, 0.0):.0f}" for f, _, _ in parsed) + " |")
    print("| **sum of test durations** | " + " | ".join(f"**{sum(f.values()):.0f}**" for f, _, _ in parsed) + " |")
    print()
    for head, (_, outcome, wall) in zip(heads, parsed):
        print(f"- {head}: {outcome}, {wall:.0f} s wall ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
