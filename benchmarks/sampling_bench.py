"""Sampling speed (ancestral vs DDIM-50), digits-feature FID of both, and a 10k-sample evaluation's wall time.

    python -m benchmarks.sampling_bench --checkpoint runs/digits/step-00004000 \\
        --rate-images 256 --fid-images 2000 --eval-images 10000 --out benchmarks/sampling_results.md

Needs a trained digits checkpoint (configs/digits.yaml). Both samplers run in the same process on the
same seeds, side by side, so a shared machine slows both alike. The target: DDIM-50 reaches a
digits-feature FID within 10% of the 1000-step ancestral sampler's at 20x fewer network evaluations.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling_bench", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a complete step-NNNNNNNN folder of a digits training")
    p.add_argument("--rate-images", type=int, default=256, help="images per sampler for the images/s figure")
    p.add_argument("--fid-images", type=int, default=2000, help="images per sampler for the FID comparison")
    p.add_argument("--eval-images", type=int, default=10_000, help="images of the timed full evaluation (0 = skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="", help="write the results table (markdown) here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from evaluation.evaluate import evaluate, load_network, read_checkpoint
    from evaluation.features import digits_extractor
    from evaluation.fid import fid, load_reference
    from pipeline.model.diffusion import Diffusion
    from pipeline.model.sampling import sample

    ckpt = Path(a.checkpoint)
    cfg, meta = read_checkpoint(ckpt)
    device = torch.device("cpu")
    net = load_network(ckpt, cfg, True, device)
    diffusion = Diffusion(cfg.diffusion)
    T = diffusion.num_timesteps
    ex = digits_extractor(device)
    ref = load_reference("train", cfg.data.shards, ex)
    samplers = {"ancestral": dict(sampler="ancestral"), "ddim-50": dict(sampler="ddim", steps=50, eta=0.0)}

    rows = []
    for name, kw in samplers.items():
        t0 = time.perf_counter()
        sample(net, diffusion, range(a.rate_images), batch_size=a.batch_size, device=device, **kw)
        rate = a.rate_images / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        imgs = sample(net, diffusion, range(a.fid_images), batch_size=a.batch_size, device=device, **kw)
        fid_s = time.perf_counter() - t0
        value = fid(ex(imgs.numpy()), ref)
        nfe = T if kw["sampler"] == "ancestral" else kw["steps"]
        rows.append((name, nfe, rate, value, fid_s))
        print(f"{name:10s} NFE {nfe:5d}  {rate:8.2f} img/s  digits-FID({a.fid_images}) {value:.3f}  ({fid_s:.0f} s)")
    ratio = rows[1][3] / rows[0][3]
    verdict = "met" if ratio <= 1.10 else "NOT met"
    print(f"DDIM-50 / ancestral digits-FID = {ratio:.3f} (target <= 1.10: {verdict})")

    eval_s = None
    if a.eval_images:
        t0 = time.perf_counter()
        r = evaluate(ckpt, [f"eval.num_samples={a.eval_images}", "eval.sampler=ddim", "eval.steps=50",
                            "eval.feature_extractor=digits", f"eval.batch_size={a.batch_size}", "eval.device=cpu"],
                     log_to_run=False, out_dir=str(Path("/tmp") / "sampling_bench_eval"))
        eval_s = time.perf_counter() - t0
        print(f"full evaluation of {a.eval_images} DDIM-50 samples (FID/KID/bits-per-dim): {eval_s:.0f} s; "
              f"digits-FID {r.metrics['eval/fid_digits']:.3f}")

    if a.out:
        machine = (f"{os.cpu_count()}-core {platform.machine()} VM, no GPU, Python {platform.python_version()}, "
                   f"torch {torch.__version__.split('+')[0]}, {torch.get_num_threads()} torch threads")
        lines = [
            "# Sampling benchmark (digits model)", "",
            f"Machine: {machine}; both samplers side by side in one run.",
            f"Checkpoint: `{ckpt}` (step {meta['step']}, EMA weights, T = {T}).", "",
            "Command:", "", "```", "python -m benchmarks.sampling_bench " + " ".join(sys.argv[1:] if argv is None else argv), "```", "",
            f"| sampler | network evaluations / image | images/s (batch {a.batch_size}) | "
            f"digits-FID ({a.fid_images} samples vs train) | sampling wall time (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]  # fmt: skip
        lines += [f"| {n} | {nfe} | {rate:.2f} | {v:.3f} | {s:.0f} |" for n, nfe, rate, v, s in rows]
        lines += ["", f"DDIM-50 / ancestral digits-FID: **{ratio:.3f}** (target <= 1.10: {verdict}).", ""]
        if eval_s is not None:
            lines += [f"Full evaluation (`python -m evaluation.evaluate`, {a.eval_images} DDIM-50 samples, "
                      f"digits FID/KID, bits/dim): **{eval_s:.0f} s** wall time.", ""]
        lines += ["digits-FID is a Fréchet distance in the digits net's features (docs/fid.md), not Inception FID."]
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
