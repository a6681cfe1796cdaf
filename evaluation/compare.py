"""Compare the runs of an MLflow experiment: a plain-text table and PNG plots.

    python -m evaluation.compare --experiment ddpm [--tracking-uri URI ...] [--out DIR] [--metric fid]

One row per run, oldest first: name, short id, status, steps, the params that differ between the runs
(only those), best and last FID with their steps, bits/dim, images/s. Writes ``DIR/fid_vs_step.png`` and
``DIR/loss_vs_step.png``, one line per run. Warns when it puts FID values of different protocols side by
side. Which metric and tag names it reads: docs/tracking.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSS_KEY = "train/loss"
IMAGES_PER_S_KEY = "train/images_per_s"
BPD_KEY = "eval/bpd"
PROTOCOL_PREFIX = "fid_protocol."
PROTOCOL_INFO_FIELDS = ("step",)  # informational: may differ without making numbers incomparable
MISSING = "-"
MAX_CELL = 32


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    latest: dict[str, float] = field(default_factory=dict)  # MLflow's latest value per metric key
    client: Any = field(default=None, repr=False)  # the MlflowClient of the store the run is in

    def protocol(self, extractor: str) -> dict[str, str]:
        prefix = f"{PROTOCOL_PREFIX}{extractor}."
        return {k[len(prefix):]: v for k, v in self.tags.items()
                if k.startswith(prefix) and k[len(prefix):] not in PROTOCOL_INFO_FIELDS}


@dataclass
class Comparison:
    table: str
    warnings: list[str]
    plots: list[Path]
    notes: list[str]


def metric_keys(runs: list[RunSummary], metric: str) -> dict[str, str]:
    """``{metric key: extractor}`` read as FID. An exact key if some run has it; else the family
    ``eval/<metric>_<ext>``."""
    every = sorted({k for r in runs for k in r.latest})
    if metric in every:
        m = re.match(r"^eval/[^/_]+_(.+)$", metric)
        return {metric: m.group(1) if m else metric}
    pattern = re.compile(rf"^eval/{re.escape(metric)}_(.+)$")
    return {k: m.group(1) for k in every if (m := pattern.match(k))}


def load_runs(tracking_uri: str, experiment: str, max_runs: int) -> list[RunSummary] | None:
    """The experiment's active runs in one store, None if the store has no such experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=max_runs, order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        summary = RunSummary(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], status=run.info.status,
            start_time=run.info.start_time or 0, params=dict(run.data.params), tags=dict(run.data.tags),
            latest=dict(run.data.metrics), client=client,
        )
        out.append(summary)
    return out


def _fill_histories(runs: list[RunSummary], keys: list[str]) -> None:
    for run in runs:
        for key in keys:
            if key in run.latest and key not in run.histories:
                hist = run.client.get_metric_history(run.run_id, key)
                run.histories[key] = sorted((m.step, m.value) for m in hist)


def _fmt(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _at(value: float, step: int, digits: int) -> str:
    return f"{value:.{digits}f} @{step}"


def _cell(text: str) -> str:
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width columns, two spaces apart, a dashed rule under the header."""
    cells = [[_cell(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def differing_params(runs: list[RunSummary]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def protocol_warnings(runs: list[RunSummary], labels: list[str], fid_keys: dict[str, str]) -> list[str]:
    """One warning per FID key whose values come from different protocols (fid_protocol.<ext>.* tags)."""
    out = []
    for key, ext in fid_keys.items():
        protocols = {label: r.protocol(ext) for label, r in zip(labels, runs) if key in r.latest}
        if len(protocols) < 2:
            continue
        unknown = [name for name, p in protocols.items() if not p]
        fields = sorted({f for p in protocols.values() for f in p})
        differ = [f for f in fields if len({p.get(f) for p in protocols.values() if p}) > 1
                  or any(p and f not in p for p in protocols.values())]
        parts = []
        for f in differ:
            parts.append(f"{f}: " + ", ".join(f"{name}={p.get(f, MISSING)}" for name, p in protocols.items() if p))
        if unknown:
            parts.append(f"no {PROTOCOL_PREFIX}{ext}.* tags (protocol unknown): {', '.join(unknown)}")
        if parts:
            out.append(f"{key} values of different protocols are side by side; they are not comparable. "
                       + "; ".join(parts))
    return out


def _labels(runs: list[RunSummary]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{r.name} ({r.run_id[:8]})" if names.count(r.name) > 1 else r.name for r in runs]


def _plot(path: Path, series: list[tuple[str, list[tuple[int, float]]]], ylabel: str, title: str,
          logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, points in series:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy and all(v > 0 for _, pts in series for _, v in pts):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def compare(runs: list[RunSummary], *, experiment: str, out_dir: str | os.PathLike, metric: str = "fid") -> Comparison:
    """Table, protocol warnings and plots for runs already loaded (histories are fetched here)."""
    fid_keys = metric_keys(runs, metric)
    _fill_histories(runs, [*fid_keys, LOSS_KEY, IMAGES_PER_S_KEY])
    labels = _labels(runs)
    params = differing_params(runs)

    header = ["run", "id", "status", "steps", *params]
    for key in fid_keys:
        header += [f"best {key}", f"last {key}"]
    header += ["bpd", "img/s"]
    rows = []
    for label, run in zip(labels, runs):
        loss = run.histories.get(LOSS_KEY, [])
        row = [label, run.run_id[:8], run.status, str(loss[-1][0]) if loss else MISSING]
        row += [run.params.get(p, MISSING) for p in params]
        for key in fid_keys:
            hist = run.histories.get(key, [])
            if hist:
                best = min(hist, key=lambda sv: (sv[1], sv[0]))
                row += [_at(best[1], best[0], 2), _at(hist[-1][1], hist[-1][0], 2)]
            else:
                row += [MISSING, MISSING]
        bpd = run.latest.get(BPD_KEY)
        ips = run.histories.get(IMAGES_PER_S_KEY, [])
        row += [_fmt(bpd, 3), _fmt(statistics.median(v for _, v in ips) if ips else None, 1)]
        rows.append(row)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, notes = [], []
    fid_series = [(f"{label} {key}" if len(fid_keys) > 1 else label, run.histories[key])
                  for label, run in zip(labels, runs) for key in fid_keys if run.histories.get(key)]
    if fid_series:
        names = ", ".join(fid_keys)
        _plot(out / "fid_vs_step.png", fid_series, names, f"{experiment}: {names} vs step")
        plots.append(out / "fid_vs_step.png")
    else:
        notes.append(f"no metric matching {metric!r} was logged; fid_vs_step.png not written")
    loss_series = [(label, run.histories[LOSS_KEY]) for label, run in zip(labels, runs) if run.histories.get(LOSS_KEY)]
    if loss_series:
        _plot(out / "loss_vs_step.png", loss_series, LOSS_KEY, f"{experiment}: {LOSS_KEY} vs step", logy=True)
        plots.append(out / "loss_vs_step.png")
    else:
        notes.append(f"no {LOSS_KEY} was logged; loss_vs_step.png not written")
    return Comparison(render_table(header, rows), protocol_warnings(runs, labels, fid_keys), plots, notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--tracking-uri", action="append", default=None,
                        help="store to read; repeat to merge several (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", default="compare-out", help="folder for the PNG plots (default: %(default)s)")
    parser.add_argument("--metric", default="fid",
                        help="FID metric: a family (fid -> eval/fid_<extractor>) or one exact key (default: %(default)s)")
    parser.add_argument("--max-runs", type=int, default=200, help="at most this many runs per store")
    args = parser.parse_args(argv)

    uris = args.tracking_uri or ([os.environ["MLFLOW_TRACKING_URI"]] if os.environ.get("MLFLOW_TRACKING_URI") else [])
    if not uris:
        print("error: no store to read: pass --tracking-uri URI (e.g. sqlite:///ABS/runs/NAME/mlflow.db, the "
              "trainer's embedded default) or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    runs: list[RunSummary] = []
    for uri in uris:
        found = load_runs(uri, args.experiment, args.max_runs)
        if found is None:
            print(f"note: {uri} has no experiment {args.experiment!r}", file=sys.stderr)
            continue
        runs += found
    if not runs:
        print(f"error: no runs of experiment {args.experiment!r} in {', '.join(uris)}; "
              "the experiment name is tracking.experiment of the training config", file=sys.stderr)
        return 2
    runs.sort(key=lambda r: r.start_time)
    result = compare(runs, experiment=args.experiment, out_dir=args.out, metric=args.metric)
    for text in result.warnings:
        print(f"WARNING: {text}", file=sys.stderr)
    print(result.table)
    for text in result.notes:
        print(f"note: {text}", file=sys.stderr)
    for path in result.plots:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
