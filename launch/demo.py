"""The one-command demo on the embedded default (``make demo``): real data, CPU, local MLflow.

    python -m launch.demo [--data data/digits] [key=value ...]

1. prepares scikit-learn's bundled handwritten digits into WebDataset shards (train + held-out test),
2. trains ``configs/digits.yaml`` with ``launch/train.py`` (one process; resumes if interrupted),
3. evaluates the newest checkpoint: digits-feature FID/KID with provenance, bits/dim on the test
   split, and the digits classifier's confident share and class histogram, printed beside the same
   figures for the held-out real digits,
4. says where the sample grid is and how to open the MLflow UI.

Everything is logged into the project's local SQLite MLflow store beside the run's out_dir. ``key=value``
overrides go to the training config (e.g. ``train.total_steps=500`` for a quick look).

    python -m launch.demo --ema-sweep      # make demo-ema: choose the EMA after training

trains the same model as ``runs/digits-ema`` keeping two more classic EMAs and EDM2's two power-function EMAs
with snapshots (``EMA_SWEEP_TRAIN``), then evaluates every stored EMA and 8 post-hoc EMA lengths of its final
checkpoint (``EMA_SWEEP_EVAL``), prints the FID curve and writes it as ``runs/digits-ema/compare/fid_vs_ema.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evaluation import compare, digits_net
from evaluation import evaluate as evaluate_cli
from evaluation.evaluate import evaluate, format_result, read_checkpoint
from evaluation.features import build_extractor
from evaluation.fid import fid, kid, load_reference, load_split_images
from pipeline import cli
from pipeline.checkpoint.folder import complete_checkpoints
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits.yaml"
EMA_SWEEP_TRAIN = ["name=digits-ema", "ema.decays=[0.99,0.995]", "ema.posthoc.sigma_rels=[0.05,0.1]"]
EMA_SWEEP_EVAL = ["--ema", "all", "--posthoc-sigma-rels", "0.02:0.25:8", "eval.num_samples=1000"]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _prepare(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file():
        splits = read_manifest(data_dir).splits
        counts = {k: sum(shard.num_samples for shard in v) for k, v in splits.items()}  # split -> its shards
        print(f"{data_dir}: already prepared ({', '.join(f'{k} {n}' for k, n in counts.items())})")
        return
    # The 10% test split is the held-out set for bits/dim and the real-digit baseline figures.
    manifest = prepare("digits", str(data_dir), test_fraction=0.1, seed=0)
    counts = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    print(f"{data_dir}: prepared {counts}")


def _train(data_dir: Path, overrides: list[str]) -> Path:
    overrides = [f"data.shards={data_dir}", *overrides]
    cfg = load_config(CONFIG, overrides)  # fail here, before a subprocess, on a bad override
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(CONFIG), *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc == cli.EXIT_PREEMPTED:
        raise SystemExit("training was preempted after writing a checkpoint; run `make demo` again to resume")
    if rc != 0:
        raise SystemExit(f"training failed (exit code {rc}); see the messages above")
    print(f"training took {time.monotonic() - t0:.0f} s")
    return ROOT / cfg.train.out_dir if not Path(cfg.train.out_dir).is_absolute() else Path(cfg.train.out_dir)


def _figures(data_dir: Path, e, samples_npz: Path) -> tuple[dict, dict]:
    """Generated vs held-out real digits on one protocol, at the same image count.

    FID is biased upwards at small counts, so the generated set is also scored on its first n images,
    n = the size of the test split: that pair of numbers is the fair comparison.
    """
    real = load_split_images(read_manifest(data_dir), "test")
    gen = np.load(samples_npz)["images"]
    extractor = build_extractor(e, torch.device("cpu"))
    ref = load_reference(e.reference, str(data_dir), extractor, cache_dir=e.stats_cache_dir,
                         max_images=e.reference_max_images)
    n = len(real)
    out = {}
    for name, images in (("real", real), ("gen_n", gen[:n])):
        feats = extractor(images, desc=f"{name} features")
        out[name] = {"fid": fid(feats, ref),
                     "kid": kid(feats, ref.feats, num_subsets=e.kid_subsets, max_subset_size=min(e.kid_subset_size, len(images))),
                     **digits_net.class_summary(digits_net.predict_proba(images), e.confidence_threshold)}
    return out["real"], out["gen_n"]


def _ema_sweep(data_dir: Path, overrides: list[str], t0: float) -> int:
    """``--ema-sweep``: train with power-function EMAs, then FID against the EMA length on the last checkpoint."""

    _banner("1/3 prepare: scikit-learn digits -> WebDataset shards")
    _prepare(data_dir)
    _banner("2/3 train: configs/digits.yaml keeping 3 classic EMAs and 2 power-function EMAs (EDM2)")
    out_dir = _train(data_dir, [*EMA_SWEEP_TRAIN, *overrides])
    _banner("3/3 evaluate every stored EMA and 8 post-hoc EMA lengths of the last checkpoint")
    code = evaluate_cli.main(["--checkpoint", str(out_dir), *EMA_SWEEP_EVAL, f"data.shards={data_dir}"])
    if code:
        raise SystemExit(f"the EMA sweep failed (exit code {code}); see the messages above")
    _banner("the curve in MLflow (evaluation.compare)")
    compare.main(["--experiment", "ddpm", "--tracking-uri", f"sqlite:///{out_dir.parent / 'mlflow.db'}",
                  "--out", str(out_dir / "compare")])
    print(f"demo took {time.monotonic() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m launch.demo", __doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "digits"), help="where the digits shards go")
    p.add_argument("--ema-sweep", action="store_true",
                   help="train runs/digits-ema with post-hoc EMAs and sweep the EMA length on its final checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides for configs/digits.yaml")
    args = p.parse_args(argv)
    return cli.run("demo", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    os.chdir(ROOT)
    t0 = time.monotonic()
    if args.ema_sweep:
        return _ema_sweep(Path(args.data).resolve(), args.overrides, t0)

    _banner("1/3 prepare: scikit-learn digits -> WebDataset shards")
    data_dir = Path(args.data).resolve()
    _prepare(data_dir)

    _banner("2/3 train: configs/digits.yaml (1 CPU process)")
    out_dir = _train(data_dir, args.overrides)

    _banner("3/3 evaluate the newest checkpoint (EMA weights)")

    ckpts = complete_checkpoints(out_dir)
    if not ckpts:
        raise SystemExit(f"no complete checkpoint in {out_dir}")
    eval_overrides = [f"data.shards={data_dir}"]
    samples_npz = out_dir / "eval" / "demo_samples.npz"
    result = evaluate(ckpts[-1], eval_overrides, save_samples_to=str(samples_npz))
    print(format_result(result))
    e = read_checkpoint(ckpts[-1], eval_overrides)[0].eval
    real, gen_n = _figures(data_dir, e, samples_npz)
    ext, short = result.provenance["extractor"], e.feature_extractor
    gen = result.classifier
    n, n_gen = sum(real["class_histogram"]), result.provenance["num_samples"]
    rows = [
        ("", f"generated ({n_gen})", f"generated, first {min(n, n_gen)}", f"held-out real ({n})"),
        (f"FID ({ext})", f"{result.metrics[f'eval/fid_{short}']:.3f}", f"{gen_n['fid']:.3f}", f"{real['fid']:.3f}"),
        (f"KID ({ext})", f"{result.metrics[f'eval/kid_{short}']:.3f}", f"{gen_n['kid']:.3f}", f"{real['kid']:.3f}"),
        (f"confident (p >= {real['threshold']})", f"{gen['confident_share']:.3f}",
         f"{gen_n['confident_share']:.3f}", f"{real['confident_share']:.3f}"),
        ("class histogram", str(gen["class_histogram"]), str(gen_n["class_histogram"]), str(real["class_histogram"])),
    ]
    _banner("demo figures (digits-feature FID: not Inception FID, not comparable with papers)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if "eval/bpd" in result.metrics:
        print(f"bits/dim (the model's variational bound on the {n} test digits): "
              f"{result.metrics['eval/bpd']:.3f} ± {result.metrics['eval/bpd_se']:.3f}")
    grid = Path(result.out_dir) / "grid.png"
    print(f"\nsample grid:  {grid}  (beside it, as many real digits: {grid.with_name('real.png')})")
    if result.mlflow_ui:  # the training run's page: its metrics, the evaluation's figures, the grids
        print(result.mlflow_ui)
    print(f"demo took {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
