"""bf16 autocast against float32 on this CPU, and on the CPUs it can pretend to be: why
``train.mixed_precision=auto`` picks bf16 only where the CPU has bf16 units (pipeline/train/step.py).

One training step (DDPMLoss forward + backward) of configs/images32_cpu.yaml's U-Net at batch 32, in float32
and under bf16 autocast, alternating step by step in one process (so load from elsewhere hits both alike). Each
ISA runs in its own process: ``ONEDNN_MAX_CPU_ISA`` (oneDNN's kernels) and ``ATEN_CPU_CAPABILITY`` (torch's
own) cap what this CPU may use, the way a CPU without AVX512_BF16 (AVX512_CORE: Skylake-SP, Ice Lake) or
without AVX-512 (AVX2: most laptops, Zen 3 and earlier) would run it. The rounds interleave the ISAs; the ratio
reported is the median over rounds with its range.

    .venv/bin/python benchmarks/cpu_bf16.py                 # 3 rounds, 5 timed steps per precision
    .venv/bin/python benchmarks/cpu_bf16.py --rounds 5 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAPS = {"native": None, "AVX512_CORE": ("AVX512_CORE", "avx512"), "AVX2": ("AVX2", "avx2")}


def measure(steps: int, batch: int) -> dict:
    """img/s of a float32 and a bf16-autocast training step (medians of ``steps`` alternating steps)."""
    import torch

    from pipeline.config import load_config
    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.model.unet import UNet
    from pipeline.train.step import cpu_has_bf16_units

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "images32_cpu.yaml",
                      ["data.shards=unused", "model.image_size=32", "model.channels=3"])
    loss = DDPMLoss(UNet(cfg.model), Diffusion(cfg.diffusion))
    x = torch.rand(batch, 3, 32, 32) * 2 - 1

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value, _ = loss(x)
        value.mean().backward()
        return time.perf_counter() - t0

    for bf16 in (False, True, False, True):  # warm-up: oneDNN builds its kernels on first use
        step(bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    return {"fp32": batch / statistics.median(times[False]), "bf16": batch / statistics.median(times[True]),
            "capability": torch.backends.cpu.get_cpu_capability(), "bf16_units": cpu_has_bf16_units()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.steps, args.batch)))
        return
    results: dict[str, list[dict]] = {name: [] for name in CAPS}
    for _ in range(args.rounds):
        for name, cap in CAPS.items():
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            for key in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
                env.pop(key, None)
            if cap:
                env["ONEDNN_MAX_CPU_ISA"], env["ATEN_CPU_CAPABILITY"] = cap
            out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch",
                                  str(args.batch)], env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.rounds} rounds x "
          f"{args.steps} steps per precision, batch {args.batch}\n")
    print("| ISA (cap) | torch capability | bf16 units (auto picks bf16) | float32 img/s | bf16 img/s | bf16 / float32 |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        ratios = sorted(r["bf16"] / r["fp32"] for r in runs)
        print(f"| {name} | {runs[0]['capability']} | {'yes' if runs[0]['bf16_units'] else 'no'} | "
              f"{statistics.median(r['fp32'] for r in runs):.1f} | {statistics.median(r['bf16'] for r in runs):.1f} | "
              f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")


if __name__ == "__main__":
    main()
