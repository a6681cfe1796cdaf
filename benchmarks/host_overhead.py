"""What the training loop's bookkeeping costs per step, phase by phase, before and after the no-sync work.

One process, one device. For each net (configs/digits.yaml's U-Net, the quarter-width CIFAR-10 net, the
CIFAR-10 net) it times, per step and round-robin (so load on a shared machine hits all rows alike):

- ``step``: the work itself, DDPMLoss forward + backward + gradient clipping + Adam (the denominator);
- ``mode``: before, ``loss_module.train()`` every step (it walks every module); after, once before the loop;
- ``seeding``: before, ``torch.manual_seed`` per micro-batch (it also seeds every other backend, lazily,
  recording a stack trace); after, ``pipeline.train.step.seed_generators`` (the CPU's and the device's generator);
- ``EMA``: before, ema-pytorch's EMA masked by a device tensor as the trainer used it until the partitioned
  EMA (it walks every module and parameter, and reads its step counter with ``.item()``); after,
  ``pipeline.train.ema.EMA.update(ok)`` (cached flat buffers, one ``lerp_``).

On a GPU every row but ``step`` is host time (the kernels run asynchronously); on a CPU the EMA rows also hold
the EMA's arithmetic, which is the same before and after (a lerp over every weight), so the EMA's host share
shows on the small nets. Medians over the rounds, in microseconds, and the phases' share of the step.

    .venv/bin/python benchmarks/host_overhead.py                        # cpu, 30 rounds
    .venv/bin/python benchmarks/host_overhead.py --nets digits --rounds 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks/ and tests/ import

from benchmarks.ema_cost import machine, sync
from pipeline.config import DiffusionConfig, EMAConfig, ModelConfig
from pipeline.model.diffusion import DDPMLoss, Diffusion
from pipeline.model.unet import UNet, count_parameters, model_config
from pipeline.train.ema import EMA
from pipeline.train.step import micro_seed, seed_generators
from tests.test_ema import _previous  # the EMA before: ema-pytorch masked by a device tensor

NETS: dict[str, tuple[Callable[[], ModelConfig], int]] = {  # the net and the batch its step is timed at
    "digits": (lambda: model_config("digits"), 64),
    "cifar-w32": (lambda: ModelConfig(**{**vars(model_config("cifar10")), "base_channels": 32}), 16),
    "cifar10": (lambda: model_config("cifar10"), 16),
}


def measure(name: str, rounds: int, device: torch.device) -> dict[str, float]:
    cfg_fn, batch = NETS[name]
    cfg = cfg_fn()
    torch.manual_seed(0)
    net = UNet(cfg).to(device)
    loss_module = DDPMLoss(net, Diffusion(DiffusionConfig()))
    adam = torch.optim.Adam(net.parameters(), lr=2e-4)
    x0 = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(1)).mul_(2).sub_(1).to(device)
    ok = torch.ones((), device=device)
    ema_cfg = EMAConfig(decay=0.9999)
    before_ema = _previous(net, ema_cfg)
    after_ema = EMA(net, ema_cfg, device=device)
    counter = iter(range(10**9))

    def step() -> None:
        loss, _ = loss_module(x0)
        loss.float().mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        adam.step()
        adam.zero_grad(set_to_none=True)

    phases: dict[str, Callable[[], None]] = {
        "step": step,
        "mode before": loss_module.train,
        "seeding before": lambda: torch.manual_seed(micro_seed(0, next(counter), 0)),
        "seeding after": lambda: seed_generators(micro_seed(0, next(counter), 0), device),
        "EMA before": lambda: before_ema.masked_update(ok),
        "EMA after": lambda: after_ema.update(ok),
    }
    times: dict[str, list[float]] = {k: [] for k in phases}
    for r in range(rounds + 3):
        for k, fn in phases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["mode after"] = 0.0
    print(f"{name}: {count_parameters(net):,} parameters, {len(list(net.modules()))} modules, "
          f"{len(list(net.parameters()))} parameter tensors, batch {batch}, step {med['step'] * 1e3:.1f} ms",
          flush=True)
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated: {', '.join(NETS)}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"machine: {machine(device)}; {a.rounds} rounds (+3 warm-up)", flush=True)
    rows = {name: measure(name, a.rounds, device) for name in a.nets.split(",")}
    print("\n| net | step ms | phase | before us | after us | before % of step | after % of step |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, med in rows.items():
        step = med["step"]
        total_b = total_a = 0.0
        for phase in ("mode", "seeding", "EMA"):
            b, af = med[f"{phase} before"], med[f"{phase} after"]
            total_b, total_a = total_b + b, total_a + af
            print(f"| {name} | {step * 1e3:.1f} | {phase} | {b * 1e6:.0f} | {af * 1e6:.0f} | "
                  f"{100 * b / step:.2f}% | {100 * af / step:.2f}% |")
        print(f"| {name} | {step * 1e3:.1f} | **all three** | {total_b * 1e6:.0f} | {total_a * 1e6:.0f} | "
              f"{100 * total_b / step:.2f}% | {100 * total_a / step:.2f}% |")


if __name__ == "__main__":
    main()
