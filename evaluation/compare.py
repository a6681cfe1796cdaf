"""Compare the runs of an MLflow experiment: a plain-text table and PNG plots.

    python -m evaluation.compare --experiment ddpm [--tracking-uri URI ...] [--out DIR] [--metric fid]
    python -m evaluation.compare --experiment ddpm --tag sweep=12345      # the runs of one sweep (sweep.sbatch)

The store is the project's one store unless named: ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<current folder>/runs/mlflow.db`` (where trainings with ``train.out_dir=runs/NAME`` log). A
``sqlite:///`` store that does not exist is refused (MLflow would create an empty one and report nothing).

One row per run, oldest first: name, short id, status, steps, the params that differ between the runs
(only those), best and last FID with their steps and their protocol, bits/dim, images/s. The protocol
column gives each run's FID sample count and, where its protocol (``fid_protocol.<ext>.*`` tags: sample
count, extractor weights, mode, reference, sampler, ...) differs from the most common one among the runs
(ties: the oldest run's), which fields differ; a warning lists the values. Writes ``DIR/fid_vs_step.png``
(runs of another protocol dashed, of an unknown one dotted, both named so in the legend) and
``DIR/loss_vs_step.png``, one line per run. Which metric and tag names it reads: docs/tracking.md.

Runs whose checkpoints were evaluated with several EMAs (``evaluate --ema all --posthoc-sigma-rels ...``) also get
a table of FID against EMA length (sigma_rel) per checkpoint, each run's best EMA, and ``DIR/fid_vs_ema.png``
(docs/fid.md, "Sweeping the EMA").
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from evaluation.errors import EvaluationError
from pipeline import cli
from pipeline.tracking.sink import ui_hint

LOSS_KEY = "train/loss"
IMAGES_PER_S_KEY = "train/images_per_s"
BPD_KEY = "eval/bpd"
PROTOCOL_PREFIX = "fid_protocol."
# informational: may differ without making numbers incomparable (the protocol's name, e.g. paper, is shown in the
# protocol column and the warnings; its settings, the other tags, decide comparability)
PROTOCOL_INFO_FIELDS = ("step", "protocol")
MISSING = "-"
MAX_CELL = 32
DEFAULT_STORE = "runs/mlflow.db"  # under the current folder: the store of trainings with train.out_dir=runs/NAME
OTHER_PROTOCOL, UNKNOWN_PROTOCOL = "other protocol", "protocol unknown"
LINE_STYLES = {"": "-", OTHER_PROTOCOL: "--", UNKNOWN_PROTOCOL: ":"}


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
    experiment_id: str = ""  # the run's experiment in its store
    tracking_uri: str = ""  # the store

    def protocol(self, extractor: str) -> dict[str, str]:
        prefix = f"{PROTOCOL_PREFIX}{extractor}."
        return {k[len(prefix):]: v for k, v in self.tags.items()
                if k.startswith(prefix) and k[len(prefix):] not in PROTOCOL_INFO_FIELDS}

    def protocol_name(self, extractor: str) -> str:
        """The evaluation's named protocol (``paper``, ``paper, modified``, ``custom``); "" if not recorded."""
        return self.tags.get(f"{PROTOCOL_PREFIX}{extractor}.protocol", "")


@dataclass
class Comparison:
    table: str
    warnings: list[str]
    plots: list[Path]
    notes: list[str]
    fid_lines: list[tuple[str, str]] = field(default_factory=list)  # (legend label, line style) in fid_vs_step.png
    ema_table: str = ""  # FID vs EMA length per run and checkpoint (evaluate --ema / --posthoc-sigma-rels)
    ema_best: list[str] = field(default_factory=list)  # one line per run: its best EMA


def metric_keys(runs: list[RunSummary], metric: str) -> dict[str, str]:
    """``{metric key: extractor}`` read as FID. An exact key if some run has it; else the family
    ``eval/<metric>_<ext>``."""
    every = sorted({k for r in runs for k in r.latest})
    if metric in every:
        m = re.match(r"^eval/[^/_]+_(.+)$", metric)
        return {metric: m.group(1) if m else metric}
    pattern = re.compile(rf"^eval/{re.escape(metric)}_(.+)$")
    return {k: m.group(1) for k in every if (m := pattern.match(k))}


def tag_filter(tags: dict[str, str]) -> str:
    """MLflow's search filter for runs carrying every tag (``tags.`sweep` = 'ID' and ...``)."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def parse_tags(items: list[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` arguments -> {KEY: VALUE}; ValueError with the fix for one that is not such a pair."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[\w.\-/]+", key) or not value or re.search(r"['`\\]", value):
            raise ValueError(f"--tag {item!r}: write KEY=VALUE (e.g. --tag sweep=12345), a tag name of letters, "
                             "digits, . _ - / and a value without quotes or backslashes")
        out[key] = value
    return out


def load_runs(tracking_uri: str, experiment: str, max_runs: int,
              tags: dict[str, str] | None = None) -> list[RunSummary] | None:
    """The experiment's active runs in one store (only those carrying every tag in `tags`, e.g. a sweep's),
    None if the store has no such experiment."""
    # mlflow: ~1.5-3 s of import, paid only by a process that talks to MLflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=tag_filter(tags or {}), max_results=max_runs,
                              order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        summary = RunSummary(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], status=run.info.status,
            start_time=run.info.start_time or 0, params=dict(run.data.params), tags=dict(run.data.tags),
            latest=dict(run.data.metrics), client=client, experiment_id=exp.experiment_id, tracking_uri=tracking_uri,
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
        names = [f"{label}={r.protocol_name(ext)}" for label, r in zip(labels, runs)
                 if key in r.latest and r.protocol_name(ext)]
        if parts and names:
            parts.append(f"protocol names: {', '.join(names)}")
        if parts:
            out.append(f"{key} values of different protocols are side by side; they are not comparable. "
                       + "; ".join(parts))
    return out


def majority_protocol(runs: list[RunSummary], key: str, ext: str) -> dict[str, str]:
    """The most common known protocol among the runs that logged ``key`` (ties: the oldest run's; runs are
    oldest first); {} when none is known."""
    known = [tuple(sorted(r.protocol(ext).items())) for r in runs if key in r.latest and r.protocol(ext)]
    return dict(Counter(known).most_common(1)[0][0]) if known else {}


def protocol_mark(run: RunSummary, ext: str, majority: dict[str, str]) -> tuple[str, list[str]]:
    """("", []) for the majority protocol, (OTHER_PROTOCOL, fields that differ) or (UNKNOWN_PROTOCOL, [])."""
    mine = run.protocol(ext)
    if not mine:
        return UNKNOWN_PROTOCOL, []
    differ = sorted(f for f in set(mine) | set(majority) if mine.get(f) != majority.get(f))
    return (OTHER_PROTOCOL, differ) if differ else ("", [])


def protocol_cell(run: RunSummary, key: str, ext: str, majority: dict[str, str]) -> str:
    """``n=1000`` (the FID's sample count), after the protocol's name where recorded (``paper, n=50000``), plus
    ``, differs: num_samples`` where the protocol is not the majority's."""
    if key not in run.latest:
        return MISSING
    mark, differ = protocol_mark(run, ext, majority)
    if mark == UNKNOWN_PROTOCOL:
        return f"? ({UNKNOWN_PROTOCOL})"
    n = f"n={run.protocol(ext).get('num_samples', '?')}"
    n = f"{run.protocol_name(ext)}, {n}" if run.protocol_name(ext) else n  # e.g. paper, n=50000
    return f"{n}, differs: {','.join(differ)}" if differ else n


def _labels(runs: list[RunSummary]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{r.name} ({r.run_id[:8]})" if names.count(r.name) > 1 else r.name for r in runs]


def _plot(path: Path, series: list[tuple[str, list[tuple[int, float]]]], ylabel: str, title: str,
          logy: bool = False, styles: list[str] | None = None) -> list[tuple[str, str]]:
    """Write the PNG; returns (legend label, line style) of each line as drawn (read back from the axes)."""
    # matplotlib: ~1.5 s of import, paid only when plots are drawn; the Agg backend before pyplot loads one
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (label, points) in enumerate(series):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label,
                linestyle=styles[i] if styles else "-")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy and all(v > 0 for _, pts in series for _, v in pts):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    drawn = [(line.get_label(), line.get_linestyle()) for line in ax.get_lines()]
    plt.close(fig)
    return drawn


def compare(runs: list[RunSummary], *, experiment: str, out_dir: str | os.PathLike, metric: str = "fid") -> Comparison:
    """Table, protocol warnings and plots for runs already loaded (histories are fetched here)."""
    fid_keys = metric_keys(runs, metric)
    _fill_histories(runs, [*fid_keys, LOSS_KEY, IMAGES_PER_S_KEY])
    labels = _labels(runs)
    params = differing_params(runs)

    majority = {key: majority_protocol(runs, key, ext) for key, ext in fid_keys.items()}
    header = ["run", "id", "status", "steps", *params]
    for key in fid_keys:
        header += [f"best {key}", f"last {key}", "protocol" if len(fid_keys) == 1 else f"protocol {key}"]
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
            row.append(protocol_cell(run, key, fid_keys[key], majority[key]))
        bpd = run.latest.get(BPD_KEY)
        ips = run.histories.get(IMAGES_PER_S_KEY, [])
        row += [_fmt(bpd, 3), _fmt(statistics.median(v for _, v in ips) if ips else None, 1)]
        rows.append(row)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, notes = [], []
    fid_series, styles = [], []
    for label, run in zip(labels, runs):
        for key, ext in fid_keys.items():
            if run.histories.get(key):
                mark = protocol_mark(run, ext, majority[key])[0]
                name = f"{label} {key}" if len(fid_keys) > 1 else label
                fid_series.append((f"{name} ({mark})" if mark else name, run.histories[key]))
                styles.append(LINE_STYLES[mark])
    fid_lines: list[tuple[str, str]] = []
    if fid_series:
        names = ", ".join(fid_keys)
        fid_lines = _plot(out / "fid_vs_step.png", fid_series, names, f"{experiment}: {names} vs step", styles=styles)
        plots.append(out / "fid_vs_step.png")
    else:
        notes.append(f"no metric matching {metric!r} was logged; fid_vs_step.png not written")
    loss_series = [(label, run.histories[LOSS_KEY]) for label, run in zip(labels, runs) if run.histories.get(LOSS_KEY)]
    if loss_series:
        _plot(out / "loss_vs_step.png", loss_series, LOSS_KEY, f"{experiment}: {LOSS_KEY} vs step", logy=True)
        plots.append(out / "loss_vs_step.png")
    else:
        notes.append(f"no {LOSS_KEY} was logged; loss_vs_step.png not written")
    ema_table, ema_best, ema_plot = ema_sweeps(runs, labels, out, metric, experiment)
    plots += [ema_plot] if ema_plot else []
    return Comparison(render_table(header, rows), protocol_warnings(runs, labels, fid_keys), plots, notes, fid_lines,
                      ema_table, ema_best)


# ------------------------------------------------------------------------------- FID vs EMA length

EMA_PREFIX = "eval/ema/"  # evaluation.evaluate's EMA_METRIC_PREFIX: eval/ema/<name>/<metric>
EMA_MARKERS = {"posthoc": "o", "power": "s", "classic": "^", "primary": "D"}


@dataclass(frozen=True)
class EMAPoint:
    step: int
    ema: str  # decay0.9999, sigma0.05, ...
    kind: str  # primary | classic | power | posthoc (tag ema_sweep.<ema>.kind)
    sigma_rel: float
    value: float  # the FID
    key: str


def ema_points(run: RunSummary, metric: str) -> list[EMAPoint]:
    """A run's EMA sweep results: one point per (checkpoint step, EMA) with its sigma_rel at that step."""
    pattern = re.compile(rf"^{re.escape(EMA_PREFIX)}([^/]+)/({re.escape(metric.removeprefix('eval/'))}"
                         rf"{'' if metric.startswith('eval/') else '_.+'})$")
    keys = [(k, m.group(1)) for k in sorted(run.latest) if (m := pattern.match(k))]

    def newest(key: str) -> dict[int, float]:  # per step, the value logged last (a sweep run again replaces it)
        hist = sorted(run.client.get_metric_history(run.run_id, key), key=lambda m: (m.timestamp, m.step))
        return {m.step: m.value for m in hist}

    out = []
    for key, ema in keys:
        sigma = newest(f"{EMA_PREFIX}{ema}/sigma_rel")
        kind = run.tags.get(f"ema_sweep.{ema}.kind", "?")
        out += [EMAPoint(step, ema, kind, sigma[step], value, key) for step, value in sorted(newest(key).items())
                if step in sigma]
    return out


def ema_sweeps(runs: list[RunSummary], labels: list[str], out: Path, metric: str, experiment: str
               ) -> tuple[str, list[str], Path | None]:
    """(table of FID vs sigma_rel per run and checkpoint, the best EMA of each run, fid_vs_ema.png or None)."""

    rows, best_lines, series = [], [], []
    for label, run in zip(labels, runs):
        points = ema_points(run, metric)
        if not points:
            continue
        best = min(points, key=lambda p: (p.value, -p.step))
        for step in sorted({p.step for p in points}):
            at = sorted((p for p in points if p.step == step), key=lambda p: p.sigma_rel)
            mine = min(at, key=lambda p: p.value)
            rows += [[label, str(step), p.ema, p.kind, f"{p.sigma_rel:.4f}", f"{p.value:.4f}",
                      "*" if p is mine else ""] for p in at]
            series.append((f"{label} @{step}", at))
        best_lines.append(f"best EMA of {label}: {best.ema} ({best.kind}, sigma_rel {best.sigma_rel:.4g}) at step "
                          f"{best.step}: {best.key.removeprefix(EMA_PREFIX + best.ema + '/')} {best.value:.4f}")
    if not rows:
        return "", [], None
    table = render_table(["run", "step", "ema", "kind", "sigma_rel", "fid", "best"], rows)

    # matplotlib: ~1.5 s of import, paid only when plots are drawn; the Agg backend before pyplot loads one
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, at in series:
        finite = [p for p in at if math.isfinite(p.sigma_rel)]
        (line,) = ax.plot([p.sigma_rel for p in finite], [p.value for p in finite], "-", lw=1, label=name)
        for kind, marker in EMA_MARKERS.items():
            pts = [p for p in finite if p.kind == kind]
            if pts:
                ax.plot([p.sigma_rel for p in pts], [p.value for p in pts], marker, color=line.get_color(), ms=5)
        top = min(finite, key=lambda p: p.value)
        ax.annotate(top.ema, (top.sigma_rel, top.value), textcoords="offset points", xytext=(0, -12), ha="center",
                    fontsize=7)
    for kind, marker in EMA_MARKERS.items():
        ax.plot([], [], marker, color="grey", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("EMA length (sigma_rel)")
    ax.set_ylabel(series[0][1][0].key.split("/")[-1])
    ax.set_title(f"{experiment}: FID vs EMA length")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_ema.png", format="png")
    plt.close(fig)
    return table, best_lines, out / "fid_vs_ema.png"


def default_store() -> str:
    """``$MLFLOW_TRACKING_URI``, else the project's one store, ``sqlite:///<abs current folder>/runs/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def missing_store(uri: str) -> str:
    """Why a store cannot be read as named ("" if it can): a ``sqlite:`` database that is not there. MLflow
    would create it, empty, and the comparison would silently show nothing of the runs meant."""
    if not uri.startswith("sqlite:"):
        return ""

    try:
        database = make_url(uri).database
    except Exception as exc:  # SQLAlchemy's ArgumentError and friends: the URI itself is malformed
        return f"--tracking-uri {uri!r} is not a valid sqlite URI ({exc}); write sqlite:///ABS/PATH/mlflow.db"
    if not database or database == ":memory:":
        return f"--tracking-uri {uri!r} names an in-memory database, which holds no runs; write sqlite:///ABS/PATH/mlflow.db"
    if not Path(database).is_file():
        return f"no MLflow store at {Path(database).resolve()} ({uri})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m evaluation.compare", __doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--tracking-uri", action="append", default=None,
                        help="store to read; repeat to merge several (default: $MLFLOW_TRACKING_URI, else "
                             f"sqlite:///<current folder>/{DEFAULT_STORE}, here {default_store()})")
    parser.add_argument("--out", default="compare-out", help="folder for the PNG plots")
    parser.add_argument("--metric", default="fid",
                        help="FID metric: a family (fid -> eval/fid_<extractor>) or one exact key")
    parser.add_argument("--max-runs", type=int, default=200, help="at most this many runs per store")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag (repeat for several), e.g. --tag sweep=ID for the runs of "
                             "one launch/slurm/sweep.sbatch array (ID: its array job id)")
    args = parser.parse_args(argv)
    return cli.run("compare", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        tags = parse_tags(args.tag)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None

    uris = args.tracking_uri or [default_store()]
    for uri in uris:
        if problem := missing_store(uri):
            how = ("pass --tracking-uri sqlite:///ABS/PATH/mlflow.db (a training with train.out_dir=DIR/NAME logs "
                   "into DIR/mlflow.db), run from the folder holding runs/, or set MLFLOW_TRACKING_URI")
            raise EvaluationError(f"{problem}; {how}" if not args.tracking_uri else f"{problem}; check the path")
    runs: list[RunSummary] = []
    for uri in uris:
        found = load_runs(uri, args.experiment, args.max_runs, tags)
        if found is None:
            print(f"note: {uri} has no experiment {args.experiment!r}", file=sys.stderr)
            continue
        runs += found
    if not runs:
        with_tags = f" with tag {', '.join(f'{k}={v}' for k, v in tags.items())}" if tags else ""
        raise EvaluationError(f"no runs of experiment {args.experiment!r}{with_tags} in {', '.join(uris)}; "
                              "the experiment name is tracking.experiment of the training config"
                              + ("; a sweep's id is its array job id (or SWEEP_ID)" if "sweep" in tags else ""))
    runs.sort(key=lambda r: r.start_time)
    title = args.experiment + "".join(f" [{k}={v}]" for k, v in tags.items())
    result = compare(runs, experiment=title, out_dir=args.out, metric=args.metric)
    for text in result.warnings:
        print(f"WARNING: {text}", file=sys.stderr)
    print(result.table)
    if result.ema_table:
        print("\nFID vs EMA length (evaluate --ema / --posthoc-sigma-rels; * = the checkpoint's best):")
        print(result.ema_table)
        print("\n".join(result.ema_best))
    for text in result.notes:
        print(f"note: {text}", file=sys.stderr)
    for path in result.plots:
        print(f"wrote {path}")
    # the experiment's training runs in the UI, once per store that had some
    for uri, exp_id in dict.fromkeys((r.tracking_uri, r.experiment_id) for r in runs):
        print(ui_hint(uri, exp_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
