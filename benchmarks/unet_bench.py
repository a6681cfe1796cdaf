"""U-Net training-step throughput on this machine: eager fp32 vs channels_last vs bf16 autocast vs torch.compile.

One training step = DDPMLoss forward (sample t and ε, q_sample, U-Net) + backward, the trainer's inner work
without the optimizer. The modes are timed round-robin within one process (one step of each mode per round)
so that load from other processes on the host hits all of them alike; the median step time is reported.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matmul/conv/SDPA FLOPs; norms and
activations are not counted). Correctness: the per-sample loss of each mode on the same batch, t and ε,
against eager fp32 (eval mode, so dropout does not differ).

    .venv/bin/python benchmarks/unet_bench.py                         # cifar10 @16 and digits @64, all modes
    .venv/bin/python benchmarks/unet_bench.py --preset digits --batch 64 --rounds 20
    .venv/bin/python benchmarks/unet_bench.py --no-compile            # skip torch.compile
    (torch.compile runs for the presets in --compile-presets, default digits: on 2 cores compiling the
    training step of the small net already takes minutes.)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pipeline.config import DiffusionConfig
from pipeline.model.diffusion import DDPMLoss, Diffusion
from pipeline.model.unet import UNet, count_parameters, model_config


def count_flops(net: UNet, batch: int) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = net.cfg
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as fc:
        net(x, t)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        net(x, t).square().mean().backward()
    net.zero_grad(set_to_none=True)
    return fwd // batch, fc.get_total_flops() // batch


def make_step(mode: str, preset: str, batch: int, diffusion: Diffusion, seed: int = 0):
    torch.manual_seed(seed)
    net = UNet(model_config(preset))
    # The authors' init makes the untrained output ~0, so every precision would give loss = mean(ε²): give the
    # output conv weight (same seed in every mode) so the loss comparison measures the network's arithmetic.
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    cl = mode in ("channels_last", "bf16_channels_last")
    if cl:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if mode in ("compile", "bf16_compile") else net
    loss_fn = DDPMLoss(model, diffusion)
    bf16 = mode.startswith("bf16")

    def run(x0: torch.Tensor, backward: bool = True) -> torch.Tensor:
        if cl:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(x0)
        if backward:
            loss.mean().backward()
            net.zero_grad(set_to_none=True)
        return loss.detach()

    return net, run


def bench_preset(preset: str, batch: int, rounds: int, modes: list[str]) -> list[dict]:
    diffusion = Diffusion(DiffusionConfig())
    cfg = model_config(preset)
    shape = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    gen = torch.Generator().manual_seed(123)
    x0 = torch.rand(shape, generator=gen) * 2 - 1

    ref_net = UNet(cfg)
    params = count_parameters(ref_net)
    fwd_flops, step_flops = count_flops(ref_net, min(batch, 4))
    del ref_net

    steps, first_s, loss_err = {}, {}, {}
    ref_loss = None
    for mode in modes:
        net, run = make_step(mode, preset, batch, diffusion)
        # Correctness on identical t and ε (global RNG reseeded), eval mode so dropout is off.
        net.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            loss = run(x0, backward=False)
        net.train()
        if ref_loss is None:
            ref_loss = loss
        loss_err[mode] = float(((loss - ref_loss).abs() / ref_loss.abs()).max())
        t0 = time.perf_counter()
        run(x0)  # warm-up (and compilation for torch.compile)
        first_s[mode] = time.perf_counter() - t0
        steps[mode] = (net, run)
        if rounds == 0:
            print(f"  {preset} {mode}: max rel. loss diff vs fp32 {loss_err[mode]:.2e}", flush=True)
            continue
        print(f"  {preset} {mode}: first step {first_s[mode]:.1f} s, max rel. loss diff vs fp32 {loss_err[mode]:.2e}",
              flush=True)

    if rounds == 0:
        return []
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            _, run = steps[mode]
            t0 = time.perf_counter()
            run(x0)
            times[mode].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes), flush=True)

    rows = []
    for mode in modes:
        med = statistics.median(times[mode])
        rows.append(dict(
            preset=preset, batch=batch, mode=mode, params=params, fwd_gflops=fwd_flops / 1e9,
            step_gflops=step_flops / 1e9, step_s=med, imgs_per_s=batch / med,
            tflops=step_flops * batch / med / 1e12, first_s=first_s[mode], loss_rel_err=loss_err[mode],
            spread=(min(times[mode]), max(times[mode])),
        ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset[:batch]; default cifar10:16 and digits:64")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per mode (round-robin); 0 = loss check only")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes (fp32 and bf16)")
    ap.add_argument("--compile-presets", default="digits", help="comma list of presets that also run compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base_modes = ["eager_fp32", "channels_last", "bf16", "bf16_channels_last"]
    presets = args.preset or ["cifar10:16", "digits:64"]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    all_rows = []
    for spec in presets:
        name, _, b = spec.partition(":")
        with_compile = not args.no_compile and name in args.compile_presets.split(",")
        all_rows += bench_preset(name, int(b or 16), args.rounds, base_modes + ["compile", "bf16_compile"] * with_compile)

    print("\n| preset | batch | mode | img/s (median) | step (s), median [min, max] | GFLOP/img fwd / fwd+bwd | achieved GFLOP/s "
          "| first step (s) | max rel. loss diff vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        print(f"| {r['preset']} ({r['params'] / 1e6:.1f}M) | {r['batch']} | {r['mode']} | {r['imgs_per_s']:.2f} | "
              f"{r['step_s']:.2f} [{r['spread'][0]:.2f}, {r['spread'][1]:.2f}] | "
              f"{r['fwd_gflops']:.2f} / {r['step_gflops']:.2f} | {r['tflops'] * 1e3:.0f} | {r['first_s']:.1f} | "
              f"{r['loss_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
