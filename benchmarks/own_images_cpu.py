"""The "Your own images" walk on a CPU, timed: a folder of 360 RGB photos -> prepare -> train a preset -> evaluate
offline, with the wall clock of each stage, the training's images/s and the sample grid beside real images.

    .venv/bin/python benchmarks/own_images_cpu.py --config configs/images32_cpu.yaml --out /tmp/own
    .venv/bin/python benchmarks/own_images_cpu.py --config configs/images32.yaml --steps 60 --out /tmp/own32

The photos: 40 random crops (half to all of the shorter side, anywhere in the picture) of each of the 9 RGB
photographs scikit-image ships (astronaut, cat, coffee cup, rocket, tissue stain, Hubble field, colour wheel,
retina, motorcycle), in one folder per picture, as a user's folder of photos of a few subjects would be.
``--steps`` trains fewer steps than the preset (to time a preset that runs for hours). Prints a Markdown block
for benchmarks/own_images_cpu_results.md and puts the grids side by side in --figure.

How close the samples are to the photos, in numbers (offline, no Inception): for each of the grid's samples and
each real test crop, the RMS pixel distance (0..1 scale) to its nearest training image (or that image
mirrored, as training flips), and which photograph that neighbour was cropped from. A sample counts as *near
the data* when its distance is within the 90th percentile of the test crops' (real crops the model never saw);
flat colour fields and noise are far from every crop. ``--evaluate-only`` re-evaluates a finished --out folder with
other evaluation overrides (e.g. ``eval.steps=250 eval.eta=1.0``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
            "retina", "stereo_motorcycle")


def write_photos(folder: Path, per_picture: int = 40, seed: int = 0) -> int:
    import skimage.data

    rng = np.random.default_rng(seed)
    n = 0
    for name in PICTURES:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        img = np.asarray(img)[..., :3]
        h, w = img.shape[:2]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_picture):
            side = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            Image.fromarray(img[y: y + side, x: x + side]).save(folder / name / f"{i:03d}.jpg", quality=92)
            n += 1
    return n


def timed(cmd: list[str], log: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.monotonic() - t0, proc.stdout + proc.stderr


def nearest(images: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each uint8 (C, H, W) image: the RMS distance (pixels in 0..1) to the nearest of ``train`` or of its
    mirror images, and that training image's index."""
    ref = np.concatenate([train, train[..., ::-1]]).reshape(2 * len(train), -1).astype(np.float64) / 255
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    d2 = (x**2).sum(1)[:, None] - 2 * x @ ref.T + (ref**2).sum(1)[None, :]
    idx = d2.argmin(1)
    return np.sqrt(np.maximum(d2[np.arange(len(x)), idx], 0) / x.shape[1]), idx % len(train)


def nearness(samples: np.ndarray, data: Path) -> dict:
    """The samples' and the real test crops' distances to the training crops (see the module's docstring)."""
    from pipeline.data.sequential import iter_split

    train = list(iter_split(str(data), "train"))
    test = np.stack([s.image for s in iter_split(str(data), "test")])
    train_images, labels = np.stack([s.image for s in train]), np.array([s.label for s in train])
    d_samples, nn_samples = nearest(samples, train_images)
    d_test, _ = nearest(test, train_images)
    p90 = float(np.quantile(d_test, 0.9))
    near = d_samples <= p90
    return {"samples": len(samples), "test": len(test), "median_sample": float(np.median(d_samples)),
            "median_test": float(np.median(d_test)), "p90_test": p90, "near": int(near.sum()),
            "subjects_near": len(set(labels[nn_samples[near]].tolist())), "subjects": len(set(labels.tolist()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/images32_cpu.yaml")
    p.add_argument("--out", type=Path, default=Path("/tmp/own_images_cpu"))
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of the preset's")
    p.add_argument("--figure", type=Path, default=None,
                   help="write the samples' grid beside the real one here (e.g. docs/assets/own_images_cpu.png)")
    p.add_argument("--evaluate-only", nargs="*", default=None, metavar="KEY=VALUE",
                   help="re-evaluate the training already in --out, with these evaluation overrides")
    args = p.parse_args()
    py = sys.executable
    photos, data, runs = args.out / "my_images", args.out / "data" / "mine", args.out / "runs"
    name = Path(args.config).stem
    t_prep = t_train = 0.0
    rates: list[float] = []
    n = 0
    if args.evaluate_only is None:
        shutil.rmtree(args.out, ignore_errors=True)
        n = write_photos(photos)
        t_prep, _ = timed([py, "-m", "pipeline.data.prepare", str(photos), "--out", str(data), "--resolution",
                           "32", "--test-fraction", "0.1"], args.out / "prepare.log")
        overrides = [f"data.shards={data}", f"name={name}", f"train.out_dir={runs / name}"]
        if args.steps:
            overrides += [f"train.total_steps={args.steps}", f"checkpoint.every_steps={args.steps}",
                          f"logging.sample_every_steps={args.steps}"]
        t_train, train_out = timed([py, "launch/train.py", "--config", args.config, *overrides],
                                   args.out / "train.log")
        rates = [float(r) for r in re.findall(r"^step \d+/\d+ .*?([\d.]+) img/s", train_out, flags=re.M)]
    grid = 64  # the README's grid; with --save-samples evaluate samples exactly these (eval.num_samples)
    samples = args.out / "samples.npz"
    t_eval, eval_out = timed([py, "-m", "evaluation.evaluate", "--checkpoint", str(runs / name), "--save-samples",
                              str(samples), "eval.feature_extractor=none", f"eval.num_samples={grid}",
                              f"eval.grid_images={grid}", *(args.evaluate_only or [])], args.out / "evaluate.log")
    figures = sorted((runs / name / "eval").glob("step-*"))[-1]
    metrics = json.loads((figures / "metrics.json").read_text())
    near = nearness(np.load(samples)["images"], data)
    plan = next((line for line in eval_out.splitlines() if line.startswith("evaluate: ")), "")
    if args.figure:
        left, right = (Image.open(figures / f).convert("RGB") for f in ("grid.png", "real.png"))
        both = Image.new("RGB", (left.width + 20 + right.width, max(left.height, right.height)), "white")
        both.paste(left, (0, 0))
        both.paste(right, (left.width + 20, 0))
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        both.save(args.figure, optimize=True)
    median_rate = float(np.median(rates[1:] or rates)) if rates else float("nan")
    cpu = platform.processor() or platform.machine()
    if args.evaluate_only is None:
        stages = (f"{n} photos -> {data.name}: prepare {t_prep:.0f} s, train {t_train:.0f} s "
                  f"({median_rate:.1f} img/s, the median of the tick lines after the first), evaluate {t_eval:.0f} s; total "
                  f"{t_prep + t_train + t_eval:.0f} s ({(t_prep + t_train + t_eval) / 60:.1f} min).")
    else:
        how = " ".join(args.evaluate_only) or "the checkpoint's own settings"
        stages = f"Re-evaluated ({how}): {t_eval:.0f} s."
    print(f"""
### {args.config}{f' ({args.steps} steps)' if args.steps else ''}

{datetime.date.today()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch
{__import__('torch').__version__}. {stages}
bits/dim (K=50 estimate) {metrics.get('eval/bpd', float('nan')):.3f} ± {metrics.get('eval/bpd_se', float('nan')):.3f}.
evaluate's plan line: `{plan}`
Near the data: {near['near']} of {near['samples']} samples ({near['subjects_near']} of the {near['subjects']} photographs
among their nearest crops); median distance to the nearest training crop {near['median_sample']:.3f} (real test
crops: {near['median_test']:.3f}, 90th percentile {near['p90_test']:.3f}).
""")


if __name__ == "__main__":
    main()
