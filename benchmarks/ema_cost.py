"""What keeping several EMAs costs: the EMA update's time as a share of the training step, on the CIFAR-10 net.

One process, one device. A training step = DDPMLoss forward (t, eps, q_sample, U-Net) + backward + gradient
clipping + fused Adam, as the trainer's inner work (bf16 autocast on a GPU, as configs/cifar10.yaml); the EMA
update = ``pipeline.train.ema.EMA.update(ok)`` with a device-side ``ok``, as the trainer calls it. Each is timed on its
own between device synchronisations, round-robin (a step, then one update of every EMA set, per round) so that
load from other processes on the host hits them alike; medians over the rounds are reported, with the share
``EMA / step``. The EMA sets:

- ``1``: the primary EMA only (today's default);
- ``3``: the primary and two more classic decays (``ema.decays``);
- ``2+posthoc``: the primary, one more decay and EDM2's two power-function EMAs (``ema.posthoc.sigma_rels``).

For reference, ``per-tensor x K``: what the update cost before the EMAs shared one matrix, one masked
``torch._foreach_lerp_`` with a device-tensor weight per EMA (torch runs that per tensor).

    .venv/bin/python benchmarks/ema_cost.py                            # cuda if there is one, batch 128
    .venv/bin/python benchmarks/ema_cost.py --device cpu --batch 16 --rounds 3
    .venv/bin/python benchmarks/ema_cost.py --precision fp32 --rounds 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from pipeline.config import DiffusionConfig, EMAConfig, PostHocConfig
from pipeline.model.diffusion import DDPMLoss, Diffusion
from pipeline.model.unet import UNet, count_parameters, model_config
from pipeline.train.ema import EMA, _float_tensors

EMA_SETS = {
    "1": EMAConfig(decay=0.9999),
    "3": EMAConfig(decay=0.9999, decays=[0.9995, 0.999]),
    "2+posthoc": EMAConfig(decay=0.9999, decays=[0.9995], posthoc=PostHocConfig(sigma_rels=[0.05, 0.10])),
}


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU used"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.platform()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PerTensor:
    """The update before the EMAs shared one matrix: per EMA, one masked ``_foreach_lerp_`` with tensor weights."""

    def __init__(self, net: torch.nn.Module, k: int):
        self.src = [t.detach() for t in _float_tensors(net)]
        self.dst = [[t.clone() for t in self.src] for _ in range(k)]

    @torch.no_grad()
    def update(self, ok: torch.Tensor) -> None:
        weight = ok.to(torch.float32) * 1e-4
        for dst in self.dst:
            torch._foreach_lerp_(dst, self.src, [weight] * len(dst))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: 128 on cuda, 16 on cpu)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default: 30 on cuda, 3 on cpu)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="",
                   help="autocast of the step (default: bf16 on cuda, as configs/cifar10.yaml; fp32 on cpu, where bf16 "
                        "is emulated without AVX-512 BF16)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the per-tensor update of before, for 1 and 4 EMAs")
    a = p.parse_args()
    device = torch.device(a.device)
    batch = a.batch or (128 if device.type == "cuda" else 16)
    rounds = a.rounds or (30 if device.type == "cuda" else 3)
    a.precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")

    torch.manual_seed(0)
    net = UNet(model_config("cifar10")).to(device)
    loss_fn = DDPMLoss(net, Diffusion(DiffusionConfig()))
    adam = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)
    x0 = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).mul_(2).sub_(1).to(device)
    ok = torch.ones((), device=device)
    sets = {name: EMA(net, cfg, device=device) for name, cfg in EMA_SETS.items()}
    if a.reference:
        sets |= {"per-tensor x1": PerTensor(net, 1), "per-tensor x4": PerTensor(net, 4)}

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=a.precision == "bf16"):
            loss, _ = loss_fn(x0)
        loss.float().mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        adam.step()
        adam.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    print(f"machine: {machine(device)}")
    print(f"CIFAR-10 net ({count_parameters(net):,} parameters) at 32x32, batch {batch}, {a.precision}, "
          f"{rounds} rounds (+2 warm-up)", flush=True)
    times: dict[str, list[float]] = {"step": [], **{name: [] for name in sets}}
    for r in range(rounds + 2):
        t = timed(step)
        ema = {name: timed(lambda e=e: e.update(ok)) for name, e in sets.items()}
        if r >= 2:
            times["step"].append(t)
            for name, v in ema.items():
                times[name].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| EMAs | EMA rows | step ms (median) | EMA update ms, median [min, max] | EMA / step |")
    print("|---|---|---|---|---|")
    for name, e in sets.items():
        rows = len(e.names) if isinstance(e, EMA) else len(e.dst)
        v = times[name]
        print(f"| {name} | {rows} | {med['step'] * 1e3:.1f} | {med[name] * 1e3:.2f} [{min(v) * 1e3:.2f}, "
              f"{max(v) * 1e3:.2f}] | {100 * med[name] / med['step']:.2f}% |")


if __name__ == "__main__":
    main()
