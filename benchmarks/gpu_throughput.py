"""Training images/s and model FLOP utilisation (MFU) of configs/cifar10.yaml on one GPU.

    python benchmarks/gpu_throughput.py [--steps 300] [--variants bf16,bf16_cl,fp16,no,bf16_compile]
    python benchmarks/gpu_throughput.py --config configs/digits.yaml --steps 20 --variants no   # CPU dry run

Each variant is one real `launch/train.py` run (1 process) on CIFAR-shaped shards of random images
(32x32x3 PNG, the data does not change the arithmetic), the paper's batch of 128, tracking, sample grids
and periodic checkpoints off. images/s is the trainer's own figure over the log ticks after the first
(start-up, cuDNN autotuning and compilation excluded). FLOPs per image come from
torch.utils.flop_counter on the same U-Net (forward; training = 3x forward), so

    MFU = images/s * 3 * forward FLOPs per image / peak FLOP/s

with the peak given by --peak-tflops (default: the device's dense bf16/fp16 tensor-core peak from the table
below; fp32 runs are held against the same figure). Prints a Markdown table; --out DIR also writes it to
DIR/gpu_throughput.md.

Variants: no (fp32 with PyTorch's defaults: TF32 for cuDNN convolutions, not for matmuls), bf16, bf16_cl
(+ channels_last), fp16 (GradScaler), bf16_compile (torch.compile).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
               "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}

VARIANTS = {
    "no": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "bf16_cl": ["train.mixed_precision=bf16", "train.channels_last=true"],
    "fp16": ["train.mixed_precision=fp16"],
    "bf16_compile": ["train.mixed_precision=bf16", "train.compile=true"],
}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # the first key in the device name: specific names come first
        if key in name:
            return value
    return None


def make_shards(root: Path, config: str, n: int) -> Path:
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data.prepare import prepare

    m = load_config(str(REPO / config), []).model
    shape = (n, m.image_size, m.image_size, m.channels) if m.channels == 3 else (n, m.image_size, m.image_size)
    src = root / "images.npy"
    np.save(src, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    out = root / "shards"
    prepare(str(src), str(out), samples_per_shard=1024, progress=False)
    return out


def forward_flops_per_image(config: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import load_config
    from pipeline.model.unet import UNet

    m = load_config(str(REPO / config), []).model
    net = UNet(m)
    x, t = torch.randn(2, m.channels, m.image_size, m.image_size), torch.tensor([1, 500])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, t)
    return fc.get_total_flops() / 2


def run_variant(name: str, config: str, shards: Path, out: Path, steps: int, log_every: int,
                workers: int) -> dict:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / config),
           f"data.shards={shards}", f"data.num_workers={workers}", f"train.out_dir={out}",
           f"train.total_steps={steps}", f"logging.every_steps={log_every}", "logging.sample_every_steps=0",
           f"checkpoint.every_steps={10 * steps}", "checkpoint.keep=1", "tracking.enabled=false",
           *VARIANTS[name]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"variant": name, "error": (r.stderr or r.stdout)[-800:]}
    ticks = [(float(ips), float(dw)) for ips, dw in
             re.findall(r"^step \d+/\d+ .* ([\d.]+) img/s  data (\d+) ms/step", r.stdout, re.M)]
    steady = ticks[1:] or ticks  # the first tick holds start-up, autotuning, compilation
    ips = sum(x for x, _ in steady) / len(steady)
    return {"variant": name, "images_per_s": ips, "data_wait_ms": sum(d for _, d in steady) / len(steady),
            "ticks": [x for x, _ in ticks], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cifar10.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--variants", default="bf16,bf16_cl,fp16,no,bf16_compile")
    ap.add_argument("--workers", type=int, default=6, help="data.num_workers")
    ap.add_argument("--images", type=int, default=16384, help="random images in the shards")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (default: from the table)")
    ap.add_argument("--out", default="", help="also write the table to OUT/gpu_throughput.md")
    a = ap.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    peak = a.peak_tflops or (peak_tflops(device) if torch.cuda.is_available() else None)
    flops = forward_flops_per_image(a.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), a.config, a.images)
        for name in a.variants.split(","):
            res = run_variant(name, a.config, shards, Path(tmp) / f"run-{name}", a.steps, a.log_every, a.workers)
            print(name, res, flush=True)
            rows.append(res)

    lines = [f"device: {device}; torch {torch.__version__}; {a.config}; {a.steps} steps, images/s averaged over "
             f"the log ticks after the first (every {a.log_every} steps); forward {flops / 1e9:.2f} GFLOP/image, "
             f"training 3x; peak {peak or '?'} TFLOP/s", "",
             "| variant | images/s | data wait (ms/step) | achieved TFLOP/s | MFU | ticks (images/s) | wall (s) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][-200:]!r} | | | | | |")
            continue
        tflops = r["images_per_s"] * 3 * flops / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "?"
        ticks = " / ".join(f"{x:.0f}" for x in r["ticks"])
        lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['data_wait_ms']:.0f} | {tflops:.1f} | {mfu} "
                     f"| {ticks} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_throughput.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
