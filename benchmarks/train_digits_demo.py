"""Does configs/digits.yaml learn recognisable digits in about 10 minutes on 2 CPU cores?

    python benchmarks/train_digits_demo.py [--out /tmp/digits-demo] [key=value ...]

Prepares the digits shards (if needed), trains `launch/train.py --config configs/digits.yaml` (wall clock
measured), samples 512 images from the final EMA (DDIM, 50 steps) and scores them with the bundled
digits classifier (evaluation/digits_net.py): the share labelled with confidence >= 0.9 and the class
histogram, next to the same numbers for 512 real training digits. Writes OUT/samples.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/digits-demo")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits

    from evaluation.digits_net import class_summary, predict_proba
    from pipeline.checkpoint.folder import complete_checkpoints, read_ema
    from pipeline.config import DiffusionConfig, ModelConfig
    from pipeline.model.diffusion import Diffusion
    from pipeline.model.sampling import sample
    from pipeline.model.unet import UNet
    from pipeline.tracking.images import image_grid

    out = Path(a.out)
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.data.prepare", "digits", "--out", str(shards), "--quiet"],
                       check=True, cwd=REPO)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "digits.yaml"),
                    f"data.shards={shards}", f"train.out_dir={out / 'run'}", *a.overrides], check=True, cwd=REPO)
    train_s = time.perf_counter() - t0
    ckpt = complete_checkpoints(out / "run")[-1]
    weights, info = read_ema(ckpt / "ema.safetensors")
    net = UNet(ModelConfig(**info["model"]))
    net.load_state_dict(weights)
    torch.manual_seed(0)
    imgs = sample(net, Diffusion(DiffusionConfig(**info["diffusion"])), range(512), sampler="ddim", steps=50,
                  batch_size=256)
    Image.fromarray(image_grid(imgs[:64]).squeeze()).resize((8 * 66, 8 * 66), Image.NEAREST).save(out / "samples.png")
    real = (load_digits().images[:512] * (255 / 16)).round().astype(np.float32)[:, None]
    gen, ref = class_summary(predict_proba(imgs.float().numpy())), class_summary(predict_proba(real))
    print(f"trained {info['step']} steps in {train_s:.0f} s (incl. start-up and checkpoints)")
    print(f"generated: confident share {gen['confident_share']:.3f}, classes {gen['class_histogram']}")
    print(f"real:      confident share {ref['confident_share']:.3f}, classes {ref['class_histogram']}")
    print(f"grid: {out / 'samples.png'}")


if __name__ == "__main__":
    main()
