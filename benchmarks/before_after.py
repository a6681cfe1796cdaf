"""Before/after on one host: the training and loader benchmarks of two source trees, run interleaved.

    git worktree add --detach /tmp/before 38d8466          # the old tree, beside this one
    .venv/bin/python benchmarks/before_after.py --before /tmp/before --after . [--rounds 3]
    git worktree remove /tmp/before

Each round runs, for each benchmark, the BEFORE tree's copy and then the AFTER tree's copy (``--order abba``
swaps the pair every other round), each from its own tree: cwd and PYTHONPATH set to that tree, the same
Python (``--python``, default: the one running this script) for both. The benchmarks and their short
configurations (about a minute each on 2 quiet cores; both options can be changed):

  train   benchmarks/train_throughput.py --steps 20 --rounds 1 --threads 2 --workloads digits
          --contenders ours_e2e,ours: images/s of launch/train.py end to end and of the phase-by-phase breakdown
  loader  benchmarks/loader_bench.py --quick --repeats 1: decoded samples/s of our loader (data.verify=stream,
          the default), wall clock and per CPU-second, 32x32 and 256x256, num_workers 0 and 1; webdataset's
          plain pipeline is the same code in both trees, so its row is a control for the host's drift

Reported per figure: the median of each side over the rounds, and after/before as the median of the per-round
ratios with their min-max spread; with the host (CPU model, cores, Python, torch), the load average around every
run, the date and the commits. Printed and written to --out (Markdown).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BENCHMARKS = {
    "train": ("benchmarks/train_throughput.py",
              "--steps 20 --rounds 1 --threads 2 --workloads digits --contenders ours_e2e,ours"),
    "loader": ("benchmarks/loader_bench.py", "--quick --repeats 1"),
}
# loader figures shown in the table (all parsed ones are kept in the per-run lines)
LOADER_SHOWN = {("stream", "wall"), ("stream", "cpu"), ("webdataset", "cpu")}


def parse_train(out: str) -> dict[str, float]:
    """``digits 0 ours_e2e {'images_per_s': 338.1}`` lines -> {"digits ours_e2e": 338.1} (img/s)."""
    figures = {}
    for m in re.finditer(r"^(\S+) (\d+) (\w+) (\{.*\})$", out, flags=re.M):
        res = ast.literal_eval(m.group(4))
        if "images_per_s" in res and "error" not in res and res["images_per_s"] > 0:
            figures[f"{m.group(1)} {m.group(3)} img/s"] = float(res["images_per_s"])
    return figures


def parse_loader(out: str) -> dict[str, float]:
    """The --quick printout -> {"32x32 w0 stream wall samples/s": 5073.0, ...}."""
    figures, case = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\d+)x\d+ RGB, num_workers=(\d+)", line)
        if m:
            case = f"{m.group(1)}x{m.group(1)} w{m.group(2)}"
            continue
        m = re.match(r"^\s+(\w+)\s+wall\s+([\d,.]+)/s \[.*?\]\s+cpu\s+([\d,.]+)/s", line)
        if m and case:
            for measure, value in (("wall", m.group(2)), ("cpu", m.group(3))):
                if (m.group(1), measure) in LOADER_SHOWN:
                    unit = "samples/s" if measure == "wall" else "samples/CPU-s"
                    loader = "webdataset (control)" if m.group(1) == "webdataset" else m.group(1)
                    figures[f"{case} {loader} {measure} {unit}"] = float(value.replace(",", ""))
    return figures


PARSERS = {"train": parse_train, "loader": parse_loader}


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def tree_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)  # only the tree: nothing of the other one leaks in
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_tree(python: str, tree: Path) -> None:
    """The tree's own `pipeline` must win over any installed (editable) copy."""
    r = subprocess.run([python, "-c", "import pipeline; print(pipeline.__file__)"], cwd=tree, env=tree_env(tree),
                       capture_output=True, text=True)
    where = r.stdout.strip()
    if r.returncode or not Path(where).resolve().is_relative_to(tree):
        sys.exit(f"before_after: in {tree}, `import pipeline` gives {where or r.stderr.strip()[-300:]!r}, "
                 "not the tree's own copy")


def git_desc(tree: Path) -> str:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "--no-optional-locks", "-C", str(tree), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"`{tree}`"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"`{tree}` ({commit}{dirty})"


def host(python: str) -> str:
    model = "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read().splitlines()
        for line in cpuinfo:
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    r = subprocess.run([python, "-c", "import platform, torch; print(platform.python_version(), torch.__version__, "
                        "torch.cuda.is_available())"], capture_output=True, text=True)
    py, torch_version, cuda = (r.stdout.split() + ["?", "?", "?"])[:3]
    return (f"{len(os.sched_getaffinity(0))}-core {os.uname().machine} ({model}{', ' + simd.upper() if simd else ''}), "
            f"{'GPU visible' if cuda == 'True' else 'no GPU'}, Python {py}, torch {torch_version.split('+')[0]}")


def run_one(python: str, tree: Path, bench: str, args: str, timeout: float, log_dir: Path | None,
            tag: str) -> dict:
    script, _ = BENCHMARKS[bench]
    cmd = [python, script, *shlex.split(args)]
    load0, t0 = loadavg(), time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n(timed out after {timeout:.0f} s)", -1
    wall, load1 = time.perf_counter() - t0, loadavg()
    if log_dir:
        (log_dir / f"{tag}.log").write_text(out)
    figures = PARSERS[bench](out)
    error = "" if rc == 0 and figures else (out.strip().splitlines() or ["(no output)"])[-1][-300:] + f" (exit {rc})"
    return {"figures": figures, "wall": wall, "load": (load0, load1), "error": error}


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 or x == int(x) else f"{x:,.1f}"


def table(runs: list[dict], rounds: int) -> list[str]:
    lines = ["| benchmark | figure | before: rounds | before median | after: rounds | after median "
             "| after / before (median of rounds) | min-max of the ratios |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | --- |"]
    for bench in BENCHMARKS:
        names: list[str] = []
        for r in runs:
            if r["bench"] == bench:
                names += [n for n in r["figures"] if n not in names]
        if not names and any(r["bench"] == bench for r in runs):
            lines.append(f"| {bench} | no figure parsed (see the runs below) | | | | | | |")
        for name in names:
            side = {s: [next((r["figures"].get(name) for r in runs if r["bench"] == bench and r["side"] == s
                              and r["round"] == i), None) for i in range(rounds)] for s in ("before", "after")}
            ratios = [a / b for b, a in zip(side["before"], side["after"]) if a is not None and b]
            cells = []
            for s in ("before", "after"):
                got = [x for x in side[s] if x is not None]
                cells += [" / ".join(fmt(x) if x is not None else "err" for x in side[s]),
                          fmt(statistics.median(got)) if got else "-"]
            ratio = f"**{statistics.median(ratios):.3f}**" if ratios else "-"
            spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
            lines.append(f"| {bench} | {name} | {' | '.join(cells)} | {ratio} | {spread} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the old source tree (e.g. a git worktree)")
    p.add_argument("--after", required=True, type=Path, help="the new source tree")
    p.add_argument("--rounds", type=int, default=3, help="before/after pairs per benchmark (default 3)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "before_after_results.md")
    p.add_argument("--python", default=sys.executable, help="one interpreter for both trees")
    p.add_argument("--benchmarks", default="train,loader")
    p.add_argument("--train-args", default=BENCHMARKS["train"][1])
    p.add_argument("--loader-args", default=BENCHMARKS["loader"][1])
    p.add_argument("--order", choices=("alternate", "abba"), default="alternate",
                   help="alternate: before then after in every round; abba: the pair swapped every other round")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--log-dir", type=Path, help="write every run's output there")
    a = p.parse_args()
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    benches = a.benchmarks.split(",")
    args = {"train": a.train_args, "loader": a.loader_args}
    for tree in trees.values():
        check_tree(a.python, tree)
        for b in benches:
            if not (tree / BENCHMARKS[b][0]).is_file():
                sys.exit(f"before_after: {tree / BENCHMARKS[b][0]} does not exist")
    if a.log_dir:
        a.log_dir.mkdir(parents=True, exist_ok=True)
    machine = host(a.python)
    start = datetime.datetime.now(datetime.timezone.utc)
    print(f"host: {machine}; load average {loadavg():.2f} at the start", flush=True)
    runs = []
    for i in range(a.rounds):
        for b in benches:
            order = ("before", "after") if a.order == "alternate" or i % 2 == 0 else ("after", "before")
            for side in order:
                r = run_one(a.python, trees[side], b, args[b], a.timeout, a.log_dir, f"{b}-{i}-{side}")
                r.update(bench=b, side=side, round=i)
                runs.append(r)
                figs = ", ".join(f"{k} {fmt(v)}" for k, v in r["figures"].items())
                print(f"round {i + 1}/{a.rounds} {b} {side}: {r['wall']:.0f} s, load {r['load'][0]:.2f}->"
                      f"{r['load'][1]:.2f}; {r['error'] or figs}", flush=True)
    end = datetime.datetime.now(datetime.timezone.utc)
    loads = [x for r in runs for x in r["load"]]
    lines = [
        "# Before/after: training and loader benchmarks, interleaved on one host",
        "",
        f"Host: {machine}. Load average (1 min) {min(loads):.1f} to {max(loads):.1f} at the runs' starts and ends"
        + " (the benchmarks' own processes and threads count: 2 threads and a loader worker load 2 cores to ~2).",
        f"Date: {start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC. Before: {git_desc(trees['before'])}. "
        f"After: {git_desc(trees['after'])}.",
        f"{a.rounds} round{'s' if a.rounds != 1 else ''}; each round runs every benchmark from the before tree and "
        f"then from the after tree ({'swapped every other round' if a.order == 'abba' else 'always in that order'}), "
        "each in its own tree (cwd and PYTHONPATH), with one Python.",
        "",
        "Command:",
        "",
        "    " + " ".join(shlex.quote(x) for x in [a.python, "benchmarks/before_after.py", *sys.argv[1:]]),
        "",
        "Per run: " + "; ".join(f"`{BENCHMARKS[b][0]} {args[b]}`" for b in benches) + ".",
        "",
        *table(runs, a.rounds),
        "",
    ]
    if a.rounds < 3:
        lines += [f"Only {a.rounds} round{'s' if a.rounds != 1 else ''}: a check of the harness, not a measurement.", ""]
    lines += ["Runs, in order (wall seconds, load average before -> after):", ""]
    for r in runs:
        lines.append(f"- round {r['round'] + 1}, {r['bench']}, {r['side']}: {r['wall']:.0f} s, load "
                     f"{r['load'][0]:.2f} -> {r['load'][1]:.2f}" + (f"; error: `{r['error']}`" if r["error"] else ""))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"wrote {a.out}")
    sys.exit(1 if any(r["error"] for r in runs) else 0)


if __name__ == "__main__":
    main()
