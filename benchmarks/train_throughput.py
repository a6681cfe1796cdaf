"""Training throughput on this machine: our trainer vs lucidrains' Trainer vs a diffusers train loop.

    python benchmarks/train_throughput.py [--steps 20] [--rounds 2] [--threads 2]

Workloads (the same batch and the same U-Net shape for all three):
  digits      configs/digits.yaml: 8x8x1, batch 64, the paper's U-Net at base 32, mult (1,2), attention at 4x4
  cifar-w32   the CIFAR-10 network at reduced width: 32x32x3, batch 16, base 32, mult (1,2,2,2), attention at 16x16

Contenders (each measured in a fresh process, rounds interleaved; best and median reported):
  ours        launch/train.py end to end (images/s of its second log tick), and a step-time breakdown of the
              same components (StreamingLoader, DDPMLoss(UNet), fused Adam, pipeline.train.ema.EMA) timed phase by phase
  lucidrains  denoising_diffusion_pytorch.Trainer driving GaussianDiffusion around OUR U-Net (same weights
              shape; its data path is an image folder + DataLoader, EMA every 10 steps, its defaults)
  diffusers   the train_unconditional example's loop (UNet2DModel, DDPMScheduler, AdamW, EMAModel every
              step), UNet2DModel configured as the DDPM U-Net of the same widths (google/ddpm-cifar10-32 style)

The competitors are NOT installed into .venv. They live in their own folder, used only here:
    .venv/bin/pip install --target /tmp/bench-pkgs --no-deps denoising-diffusion-pytorch==2.3.4 \
        diffusers==0.42.1 einops==0.8.2 pytorch-fid==0.3.0
and this script puts /tmp/bench-pkgs (or $BENCH_PKGS) on their subprocesses' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKGS = os.environ.get("BENCH_PKGS", "/tmp/bench-pkgs")

WORKLOADS = {
    "digits": dict(size=8, channels=1, batch=64, base=32, mult=[1, 2], attn=[4], dropout=0.1),
    "cifar-w32": dict(size=32, channels=3, batch=16, base=32, mult=[1, 2, 2, 2], attn=[16], dropout=0.1),
}


def model_overrides(w: dict) -> list[str]:
    return [f"model.image_size={w['size']}", f"model.channels={w['channels']}", f"model.base_channels={w['base']}",
            f"model.channel_mult={w['mult']}".replace(" ", ""), "model.num_res_blocks=2",
            f"model.attn_resolutions={w['attn']}".replace(" ", ""), f"model.dropout={w['dropout']}"]


def make_data(root: Path, w: dict, name: str) -> tuple[Path, Path]:
    """Shards (ours) and a PNG folder (lucidrains) of the same images: real digits, or random RGB."""
    import numpy as np
    from PIL import Image

    if name == "digits":
        from sklearn.datasets import load_digits

        imgs = (load_digits().images * (255 / 16)).astype(np.uint8)
    else:
        imgs = np.random.default_rng(0).integers(0, 256, (512, w["size"], w["size"], 3), dtype=np.uint8)
    np.save(root / f"{name}.npy", imgs)
    from pipeline.data.prepare import prepare

    shards = root / f"{name}-shards"
    prepare(str(root / f"{name}.npy"), str(shards), samples_per_shard=512, progress=False, workers=1)
    folder = root / f"{name}-png"
    folder.mkdir()
    for i, im in enumerate(imgs[:512]):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return shards, folder


# --- workers (run in a subprocess each) -------------------------------------------------------------


def _unet(w: dict):
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model.unet import UNet

    torch.manual_seed(0)
    return UNet(ModelConfig(image_size=w["size"], channels=w["channels"], base_channels=w["base"],
                            channel_mult=w["mult"], num_res_blocks=2, attn_resolutions=w["attn"],
                            dropout=w["dropout"]))


def worker_ours_breakdown(w: dict, shards: str, steps: int) -> dict:
    """The trainer's loop body, one phase at a time (CPU: the timers are exact, no device queue)."""
    import math

    import torch
    from accelerate import Accelerator

    from pipeline.config import DataConfig, DiffusionConfig, EMAConfig
    from pipeline.data.loader import StreamingLoader
    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.train.ema import EMA

    net = _unet(w)
    ema = EMA(net, EMAConfig(decay=0.9999, warmup_steps=0, update_every=1, power=0.75))
    acc = Accelerator()
    model, opt = acc.prepare(DDPMLoss(net, Diffusion(DiffusionConfig())), torch.optim.Adam(net.parameters(), 2e-4,
                                                                                         fused=True))
    loader = iter(StreamingLoader(DataConfig(shards=shards, num_workers=1, hflip=False), batch_size=w["batch"]))
    phases = {"data_wait": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0, "ema": 0.0}
    for i in range(steps * 2):
        t0 = time.perf_counter()
        x = next(loader)["image"]
        t1 = time.perf_counter()
        loss, _ = model(x)
        acc.backward(loss.mean())
        t2 = time.perf_counter()
        norm = acc.clip_grad_norm_(model.parameters(), 1.0)
        ok = torch.isfinite(norm)
        opt.optimizer.found_inf = (~ok).float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        ema.update(ok.float())
        t4 = time.perf_counter()
        if i >= steps:  # the first half warms up
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += dt
    total = sum(phases.values())
    out = {k: v / steps for k, v in phases.items()}
    out.update(step_s=total / steps, images_per_s=steps * w["batch"] / total, ema_pct=100 * phases["ema"] / total)
    assert math.isfinite(total)
    return out


def worker_ours_e2e(w: dict, shards: str, steps: int, out_dir: str) -> dict:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "digits.yaml"),
           *model_overrides(w), f"data.shards={shards}", "data.num_workers=1", "data.hflip=false",
           f"train.out_dir={out_dir}", f"train.batch_size={w['batch']}", f"train.total_steps={2 * steps}",
           f"logging.every_steps={steps}", f"checkpoint.every_steps={10 * steps}", "logging.sample_every_steps=0",
           "tracking.enabled=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    # the tick lines only (the closing summary's "img/s overall" includes the start-up)
    rates = [float(m) for m in re.findall(r"^step \d+/\d+ .*?([\d.]+) img/s", r.stdout, flags=re.M)]
    if r.returncode or len(rates) < 2:
        raise RuntimeError(r.stderr[-2000:])
    return {"images_per_s": rates[-1]}


def worker_lucidrains(w: dict, folder: str, steps: int, out_dir: str) -> dict:
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer

    class Wrapped(torch.nn.Module):  # the attributes GaussianDiffusion reads from its model
        def __init__(self, net):
            super().__init__()
            self.net, self.channels, self.out_dim, self.self_condition = net, w["channels"], w["channels"], False
            self.random_or_learned_sinusoidal_cond = False

        def forward(self, x, t, x_self_cond=None):
            return self.net(x, t)

    diffusion = GaussianDiffusion(Wrapped(_unet(w)), image_size=w["size"], timesteps=1000, objective="pred_noise",
                                  beta_schedule="linear")
    trainer = Trainer(diffusion, folder, train_batch_size=w["batch"], train_lr=2e-4, train_num_steps=steps,
                      save_and_sample_every=10**9, calculate_fid=False, results_folder=out_dir,
                      augment_horizontal_flip=False)
    trainer.train()  # warm-up
    trainer.train_num_steps = 2 * steps
    t0 = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t0
    return {"images_per_s": steps * w["batch"] / dt, "step_s": dt / steps}


def worker_diffusers(w: dict, folder: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import transforms

    levels = len(w["mult"])
    res = [w["size"] // 2**i for i in range(levels)]
    down = tuple("AttnDownBlock2D" if r in w["attn"] else "DownBlock2D" for r in res)
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=w["size"], in_channels=w["channels"], out_channels=w["channels"],
                        layers_per_block=2, block_out_channels=tuple(w["base"] * m for m in w["mult"]),
                        down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
                        dropout=w["dropout"], norm_num_groups=32)
    files = sorted(Path(folder).glob("*.png"))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("L" if w["channels"] == 1 else "RGB"))

    acc = Accelerator()
    dl = DataLoader(DS(), batch_size=w["batch"], shuffle=True, num_workers=1, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=10**6)
    model, opt, dl, lr_sched = acc.prepare(model, opt, dl, lr_sched)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def batches():
        while True:
            yield from dl

    it, t0 = batches(), 0.0
    for i in range(2 * steps):
        if i == steps:
            t0 = time.perf_counter()
        clean = next(it)
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (clean.shape[0],))
        with acc.accumulate(model):
            pred = model(sched.add_noise(clean, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
        if acc.sync_gradients:
            ema.step(model.parameters())
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"images_per_s": steps * w["batch"] / dt, "step_s": dt / steps, "params": n_params}


# --- driver ----------------------------------------------------------------------------------------


def sub(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{REPO}:{PKGS}", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                       cwd=REPO)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr or r.stdout)[-600:]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="timed steps (after as many warm-up steps)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="digits,cifar-w32")
    p.add_argument("--contenders", default="ours_e2e,ours,lucidrains,diffusers",
                   help="which to run (ours_e2e,ours need no extra packages)")
    p.add_argument("--worker", nargs="*")
    a = p.parse_args()
    if a.worker:
        kind, name, data, steps, *rest = a.worker
        w, steps = WORKLOADS[name], int(steps)
        fn = {"ours": worker_ours_breakdown, "ours_e2e": worker_ours_e2e, "lucidrains": worker_lucidrains,
              "diffusers": worker_diffusers}[kind]
        print(json.dumps(fn(w, data, steps, *rest)))
        return
    import torch

    from pipeline.model.unet import count_parameters

    results: dict = {}
    rounds: dict = {}  # every round's images/s, for the median and the spread
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in a.workloads.split(","):
            w = WORKLOADS[name]
            shards, folder = make_data(root, w, name)
            for r in range(a.rounds):
                for kind, data, rest in (("ours_e2e", shards, [str(root / f"o{r}{name}")]), ("ours", shards, []),
                                         ("lucidrains", folder, [str(root / f"l{r}{name}")]),
                                         ("diffusers", folder, [])):
                    if kind not in a.contenders.split(","):
                        continue
                    res = sub([kind, name, str(data), str(a.steps), *rest], a.threads)
                    print(name, r, kind, res, flush=True)
                    rounds.setdefault((name, kind), []).append(res.get("images_per_s", 0.0))
                    best = results.setdefault((name, kind), res)
                    if res.get("images_per_s", 0) > best.get("images_per_s", 0):
                        results[(name, kind)] = res
            results[(name, "params")] = count_parameters(_unet(w))
    print(f"\n## Training throughput ({a.steps} timed steps, best of {a.rounds} rounds, {a.threads} threads, "
          f"torch {torch.__version__})\n")
    print("| workload | contender | images/s (best) | median | rounds | step (s) | data wait | fwd+bwd | optimizer | EMA "
          "| EMA % of step |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in a.workloads.split(","):
        for kind in [k for k in ("ours_e2e", "ours", "lucidrains", "diffusers") if (name, k) in results]:
            r = results[(name, kind)]
            if "error" in r:
                print(f"| {name} | {kind} | error: {r['error'][-120:]!r} | | | | | | | | |")
                continue
            cells = [f"{r[k] * 1e3:.1f} ms" if k in r else "" for k in ("data_wait", "fwd_bwd", "optimizer", "ema")]
            pct = f"{r['ema_pct']:.1f}%" if "ema_pct" in r else ""
            step = f"{r['step_s']:.3f}" if "step_s" in r else f"{WORKLOADS[name]['batch'] / r['images_per_s']:.3f}"
            all_rounds = rounds[(name, kind)]
            spread = " / ".join(f"{x:.1f}" for x in all_rounds)
            print(f"| {name} | {kind} | {r['images_per_s']:.1f} | {statistics.median(all_rounds):.1f} | {spread} | {step} "
                  f"| {' | '.join(cells)} | {pct} |")
        print(f"| {name} | (U-Net parameters: ours/lucidrains {results[(name, 'params')]:,}; diffusers "
              f"{results.get((name, 'diffusers'), {}).get('params', 0):,}) | | | | | | | | | |")


if __name__ == "__main__":
    main()
