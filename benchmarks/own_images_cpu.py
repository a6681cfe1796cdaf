"""The "Your own images" walk on a CPU, timed: a folder of 360 RGB photos -> prepare -> train a preset -> evaluate
offline, with the wall clock of each stage, the training's images/s and the sample grid beside real images.

    .venv/bin/python benchmarks/own_images_cpu.py --config configs/images32_cpu.yaml --out /tmp/own
    .venv/bin/python benchmarks/own_images_cpu.py --config configs/images32.yaml --steps 60 --out /tmp/own32

The photos: 40 random crops (half to all of the shorter side, anywhere in the picture) of each of the 9 RGB
photographs scikit-image ships (astronaut, cat, coffee cup, rocket, tissue stain, Hubble field, colour wheel,
retina, motorcycle), in one folder per picture, as a user's folder of photos of a few subjects would be.
``--steps`` trains fewer steps than the preset (to time a preset that runs for hours). Prints a Markdown block
for benchmarks/own_images_cpu_results.md and copies the grids to --assets.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/images32_cpu.yaml")
    p.add_argument("--out", type=Path, default=Path("/tmp/own_images_cpu"))
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of the preset's")
    p.add_argument("--assets", type=Path, default=None, help="copy grid.png and real.png here (e.g. docs/assets)")
    args = p.parse_args()
    py = sys.executable
    shutil.rmtree(args.out, ignore_errors=True)
    photos, data, runs = args.out / "my_images", args.out / "data" / "mine", args.out / "runs"
    n = write_photos(photos)
    name = Path(args.config).stem
    t_prep, _ = timed([py, "-m", "pipeline.data.prepare", str(photos), "--out", str(data), "--resolution", "32",
                       "--test-fraction", "0.1"], args.out / "prepare.log")
    overrides = [f"data.shards={data}", f"name={name}", f"train.out_dir={runs / name}"]
    if args.steps:
        overrides += [f"train.total_steps={args.steps}", f"checkpoint.every_steps={args.steps}",
                      f"logging.sample_every_steps={args.steps}"]
    t_train, train_out = timed([py, "launch/train.py", "--config", args.config, *overrides], args.out / "train.log")
    rates = [float(r) for r in re.findall(r"^step \d+/\d+ .*?([\d.]+) img/s", train_out, flags=re.M)]
    t_eval, eval_out = timed([py, "-m", "evaluation.evaluate", "--checkpoint", str(runs / name),
                              "eval.feature_extractor=none"], args.out / "evaluate.log")
    figures = sorted((runs / name / "eval").glob("step-*"))[-1]
    metrics = json.loads((figures / "metrics.json").read_text())
    plan = next((line for line in eval_out.splitlines() if line.startswith("evaluate: ")), "")
    if args.assets:
        args.assets.mkdir(parents=True, exist_ok=True)
        for grid in ("grid.png", "real.png"):
            shutil.copy(figures / grid, args.assets / f"own_images_cpu_{grid}")
    median_rate = float(np.median(rates[1:] or rates)) if rates else float("nan")
    cpu = platform.processor() or platform.machine()
    print(f"""
### {args.config}{f' ({args.steps} steps)' if args.steps else ''}

{datetime.date.today()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch
{__import__('torch').__version__}. {n} photos -> {data.name}: prepare {t_prep:.0f} s, train {t_train:.0f} s
({median_rate:.1f} img/s, the median of the tick lines after the first), evaluate {t_eval:.0f} s;
total {t_prep + t_train + t_eval:.0f} s ({(t_prep + t_train + t_eval) / 60:.1f} min).
bits/dim (K=50 estimate) {metrics.get('eval/bpd', float('nan')):.3f} ± {metrics.get('eval/bpd_se', float('nan')):.3f}.
evaluate's plan line: `{plan}`
""")


if __name__ == "__main__":
    main()
