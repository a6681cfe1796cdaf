"""The measured differences from the authors' code (docs/model.md, "Reproducing Table 1"), on the digits demo.

    python -m benchmarks.paper_differences --only decoder clipping late --clip-steps 300 --late-batches 50 --threads 1
    python -m benchmarks.paper_differences --only ddim --ddim-images 2000 --ddim-steps 30 --threads 2
    python -m benchmarks.paper_differences --only ddim --ddim-images 200 --ddim-steps 300 --threads 2

(the runs behind docs/model.md's table, on runs/digits/step-00004000, the demo's checkpoint; on a loaded 2-core
VM they took 5 s, 632 + 570 s, 100 s, 1656 s and 1215 s).

Four measurements, each on CPU in minutes, printed as markdown rows (--only picks some):

- decoder: the bound's L_0 in bits/dim over the held-out test split, with the exact discretised Gaussian (what
  pipeline/model/diffusion.py computes) and with the authors' tanh-approximated CDF in float32
  (discretized_gaussian_log_likelihood_tanh); every other term of the bound is the same, so the difference of the
  L_0 means is the difference of the bounds;
- clipping: the configs/digits.yaml recipe (batch 64, Adam 1e-3, warm-up 200, clip 1.0) trained for --clip-steps
  steps twice from the same start, once per rule (the 64-image gradient clipped once; each 16-image group's
  gradient clipped, then averaged: optimizer.grad_clip_per=16), recording at every step the global norm of the
  batch gradient and of each group's: the share of steps the batch rule clips, of groups the per-group rule clips,
  and of steps where it clips at least one group;
- late clipping: the same two shares at the checkpoint's trained raw weights over --late-batches batches (no
  update): how often each rule would clip at the end of the demo's training;
- DDIM step lists: the same seeds sampled with the DDIM authors' list (eval.spacing=uniform) and with the list
  this project used before (leading), for step counts that do not divide T: digits-feature FID against the train
  split, digits-classifier confident share, and the mean pixel change between the paired images. Counts that
  divide T (the shipped 20, 50, 100) give the same list both ways.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def host() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()}-core {platform.machine()}, Python {platform.python_version()}, torch "
            f"{torch.__version__.split('+')[0]}, {torch.get_num_threads()} torch threads, load average {load:.1f}")


def decoder(ckpt: Path, batch_size: int) -> dict[str, float]:
    """Mean L_0 (bits/dim) over the test split with the exact and the tanh-approximated decoder."""
    from evaluation.evaluate import held_out_batches, load_network, read_checkpoint
    from pipeline.model.diffusion import (
        Diffusion,
        discretized_gaussian_log_likelihood,
        discretized_gaussian_log_likelihood_tanh,
    )

    cfg, _ = read_checkpoint(ckpt)
    net = load_network(ckpt, cfg, True, torch.device("cpu"))
    diffusion = Diffusion(cfg.diffusion)
    exact, approx, approx64 = [], [], []
    with torch.no_grad():
        for batch in held_out_batches(cfg.data.shards, "test", 10**9, batch_size):
            x0 = batch["image"]
            gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            t = torch.zeros(len(x0), dtype=torch.long)
            mean, _, logvar, _ = diffusion.p_mean_variance(net, diffusion.q_sample(x0, t, noise), t)
            tanh64 = partial(discretized_gaussian_log_likelihood_tanh, dtype=torch.float64)
            for fn, out in ((discretized_gaussian_log_likelihood, exact),
                            (discretized_gaussian_log_likelihood_tanh, approx), (tanh64, approx64)):
                out.append(-fn(x0, mean, 0.5 * logvar).double().mean(dim=(1, 2, 3)) / np.log(2.0))
    e, a, a64 = torch.cat(exact), torch.cat(approx), torch.cat(approx64)
    return {"images": len(e), "exact_bpd": float(e.mean()), "tanh_bpd": float(a.mean()),
            "diff_bpd": float((a - e).mean()), "max_abs_diff_per_image": float((a - e).abs().max()),
            "diff64_bpd": float((a64 - e).mean()), "max_abs_diff64_per_image": float((a64 - e).abs().max())}


def clipping(steps: int, group: int, clip_rule: str) -> dict[str, float]:
    """Train configs/digits.yaml for ``steps`` steps under one rule; the clip shares under both rules."""
    from pipeline.config import load_config
    from pipeline.data.loader import StreamingLoader
    from pipeline.geometry import resolve_geometry
    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.model.unet import UNet
    from pipeline.train.step import lr_at, micro_seed, seed_generators

    cfg = resolve_geometry(load_config("configs/digits.yaml", ["data.num_workers=0"]))
    oc, batch = cfg.optimizer, cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)
    net = UNet(cfg.model)
    loss_fn = DDPMLoss(net, Diffusion(cfg.diffusion)).train()
    params = list(net.parameters())
    adam = torch.optim.Adam(params, lr=lr_at(0, oc.lr, oc.warmup_steps), betas=(oc.adam_beta1, oc.adam_beta2),
                            eps=oc.adam_eps, fused=True)
    data = iter(StreamingLoader(cfg.data, batch_size=batch))
    global_norms, group_norms = [], []
    for step in range(steps):
        x = next(data)["image"]
        grads, norms = [], []
        for m, xg in enumerate(x.split(group)):
            seed_generators(micro_seed(cfg.train.seed, step, m), torch.device("cpu"))
            net.zero_grad(set_to_none=True)
            loss_fn(xg)[0].float().mean().backward()
            grads.append([p.grad.clone() for p in params])
            norms.append(float(torch.nn.utils.get_total_norm(grads[-1])))
        mean = [sum(g[i] for g in grads) / len(grads) for i in range(len(params))]
        global_norms.append(float(torch.nn.utils.get_total_norm(mean)))
        group_norms.append(norms)
        if clip_rule == "batch":
            final = [t * min(1.0, oc.grad_clip / (global_norms[-1] + 1e-6)) for t in mean]
        else:
            final = [sum(g[i] * min(1.0, oc.grad_clip / (n + 1e-6)) for g, n in zip(grads, norms)) / len(grads)
                     for i in range(len(params))]
        for p, g in zip(params, final):
            p.grad = g
        for pg in adam.param_groups:
            pg["lr"] = lr_at(step, oc.lr, oc.warmup_steps)
        adam.step()
    gn, grp = np.array(global_norms), np.array(group_norms)
    after = slice(oc.warmup_steps, None)
    return {
        "steps": steps, "groups": grp.shape[1], "batch": batch,
        "batch_rule_clips_steps": float((gn > oc.grad_clip).mean()),
        "group_rule_clips_groups": float((grp > oc.grad_clip).mean()),
        "group_rule_clips_a_step": float((grp > oc.grad_clip).any(axis=1).mean()),
        "after_warmup_batch_rule": float((gn[after] > oc.grad_clip).mean()) if steps > oc.warmup_steps else float("nan"),
        "after_warmup_group_rule_groups": float((grp[after] > oc.grad_clip).mean()) if steps > oc.warmup_steps
        else float("nan"),
        "median_group_over_batch_norm": float(np.median(grp / gn[:, None])),
    }


def late_norms(ckpt: Path, batches: int, group: int) -> dict[str, float]:
    """The clip shares at the checkpoint's raw (trained) weights over ``batches`` training batches, no update:
    how often each rule clips late in training."""
    from evaluation.evaluate import load_network, read_checkpoint
    from pipeline.data.loader import StreamingLoader
    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.train.step import micro_seed, seed_generators

    cfg, meta = read_checkpoint(ckpt, ["data.num_workers=0"])
    net = load_network(ckpt, cfg, False, torch.device("cpu")).requires_grad_(True).train()
    loss_fn = DDPMLoss(net, Diffusion(cfg.diffusion)).train()
    params = list(net.parameters())
    data = iter(StreamingLoader(cfg.data, batch_size=cfg.train.batch_size))
    batch_norms, group_norms = [], []
    for b in range(batches):
        grads = []
        for m, xg in enumerate(next(data)["image"].split(group)):
            seed_generators(micro_seed(cfg.train.seed, int(meta["step"]) + b, m), torch.device("cpu"))
            net.zero_grad(set_to_none=True)
            loss_fn(xg)[0].float().mean().backward()
            grads.append([q.grad.clone() for q in params])
        group_norms.append([float(torch.nn.utils.get_total_norm(g)) for g in grads])
        batch_norms.append(float(torch.nn.utils.get_total_norm(
            [sum(g[i] for g in grads) / len(grads) for i in range(len(params))])))
    gn, grp, clip = np.array(batch_norms), np.array(group_norms), cfg.optimizer.grad_clip
    return {"step": int(meta["step"]), "batches": batches, "batch_rule": float((gn > clip).mean()),
            "group_rule_groups": float((grp > clip).mean()), "group_rule_a_step": float((grp > clip).any(1).mean()),
            "median_batch_norm": float(np.median(gn)), "median_group_norm": float(np.median(grp))}


def ddim_lists(ckpt: Path, images: int, step_counts: list[int], batch_size: int) -> list[dict[str, float]]:
    """Digits-FID, confident share and paired pixel change: uniform (the DDIM authors') vs leading (before)."""
    from evaluation import digits_net
    from evaluation.evaluate import load_network, read_checkpoint
    from evaluation.features import digits_extractor
    from evaluation.fid import fid, load_reference
    from pipeline.model.diffusion import Diffusion
    from pipeline.model.sampling import ddim_timesteps, sample

    cfg, _ = read_checkpoint(ckpt)
    device = torch.device("cpu")
    net = load_network(ckpt, cfg, True, device)
    diffusion = Diffusion(cfg.diffusion)
    ex = digits_extractor(device)
    ref = load_reference("train", cfg.data.shards, ex)
    T, rows = diffusion.num_timesteps, []
    for k in step_counts:
        out = {"steps": k}
        imgs = {}
        for spacing in ("leading", "uniform"):
            seq = ddim_timesteps(T, k, spacing)
            t0 = time.perf_counter()
            imgs[spacing] = sample(net, diffusion, range(images), steps=k, spacing=spacing, batch_size=batch_size,
                                   device=device).numpy()
            out[f"{spacing}_evals"], out[f"{spacing}_first_t"] = len(seq), seq[-1]
            out[f"{spacing}_fid"] = fid(ex(imgs[spacing]), ref)
            probs = digits_net.predict_proba(imgs[spacing])
            out[f"{spacing}_confident"] = digits_net.class_summary(probs)["confident_share"]
            out[f"{spacing}_s"] = time.perf_counter() - t0
        diff = np.abs(imgs["uniform"].astype(np.int16) - imgs["leading"].astype(np.int16))
        out["mean_abs_pixel_levels"], out["changed_pixels"] = float(diff.mean()), float((diff > 0).mean())
        rows.append(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_differences", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default="runs/digits/step-00004000", help="a trained digits checkpoint folder")
    p.add_argument("--only", nargs="*", default=["decoder", "clipping", "late", "ddim"],
                   help="which measurements (late: the clip shares at the checkpoint's trained weights)")
    p.add_argument("--clip-steps", type=int, default=300, help="training steps per clipping rule")
    p.add_argument("--clip-group", type=int, default=16, help="images per group for the per-group rule")
    p.add_argument("--late-batches", type=int, default=50, help="batches scored at the checkpoint's raw weights")
    p.add_argument("--ddim-images", type=int, default=2000, help="samples per DDIM list")
    p.add_argument("--ddim-steps", type=int, nargs="*", default=[30], help="DDIM step counts not dividing T")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = Path(a.checkpoint)
    print(f"host: {host()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if "decoder" in a.only:
        t0 = time.perf_counter()
        d = decoder(ckpt, a.batch_size)
        print(f"| decoder L_0 on {d['images']} test images | exact {d['exact_bpd']:.6f} bits/dim | authors' tanh "
              f"(float32) {d['tanh_bpd']:.6f}: {d['diff_bpd']:+.2e} (per image at most "
              f"{d['max_abs_diff_per_image']:.2e}) | tanh in float64: {d['diff64_bpd']:+.2e} (per image at most "
              f"{d['max_abs_diff64_per_image']:.2e}) | {time.perf_counter() - t0:.0f} s |", flush=True)
    if "clipping" in a.only:
        for rule in ("batch", "group"):
            t0 = time.perf_counter()
            c = clipping(a.clip_steps, a.clip_group, rule)
            print(f"| clipping, training under the {rule} rule, {c['steps']} steps of {c['batch']} = {c['groups']} "
                  f"x {a.clip_group} | batch rule clips {c['batch_rule_clips_steps']:.1%} of steps "
                  f"({c['after_warmup_batch_rule']:.1%} after warm-up) | group rule clips "
                  f"{c['group_rule_clips_groups']:.1%} of groups ({c['after_warmup_group_rule_groups']:.1%} after "
                  f"warm-up), at least one in {c['group_rule_clips_a_step']:.1%} of steps | median group/batch norm "
                  f"{c['median_group_over_batch_norm']:.2f} | {time.perf_counter() - t0:.0f} s |", flush=True)
    if "late" in a.only:
        t0 = time.perf_counter()
        c = late_norms(ckpt, a.late_batches, a.clip_group)
        print(f"| clipping at the trained raw weights (step {c['step']}), {c['batches']} batches, no update | batch "
              f"rule clips {c['batch_rule']:.1%} (median norm {c['median_batch_norm']:.3f}) | group rule clips "
              f"{c['group_rule_groups']:.1%} of groups (median norm {c['median_group_norm']:.3f}), at least one "
              f"in {c['group_rule_a_step']:.1%} of batches | {time.perf_counter() - t0:.0f} s |", flush=True)
    if "ddim" in a.only:
        for r in ddim_lists(ckpt, a.ddim_images, a.ddim_steps, a.batch_size):
            print(f"| DDIM-{r['steps']}, {a.ddim_images} samples | leading: {r['leading_evals']} steps from t="
                  f"{r['leading_first_t']}, digits-FID {r['leading_fid']:.3f}, confident {r['leading_confident']:.3f} "
                  f"| uniform: {r['uniform_evals']} steps from t={r['uniform_first_t']}, digits-FID "
                  f"{r['uniform_fid']:.3f}, confident {r['uniform_confident']:.3f} | paired images: "
                  f"{r['changed_pixels']:.1%} of pixels change, mean {r['mean_abs_pixel_levels']:.2f} levels | "
                  f"{r['leading_s'] + r['uniform_s']:.0f} s |", flush=True)
    print(f"host at the end: {host()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
