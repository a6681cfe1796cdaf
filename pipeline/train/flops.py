"""Utilisation: the training step's FLOPs per image, counted once, and the GPU's dense peak to divide by (MFU).

``step_flops_per_image(cfg)`` runs one training step of the configured U-Net (DDPMLoss forward + backward) on
the ``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``: shapes only, no arithmetic, so the cost
is the counter's per-op dispatch (about a second for any of our configs) whatever the model's size; the result
is kept in a per-user cache keyed by the model and diffusion config and the torch version
(``$XDG_CACHE_HOME/ddpm-pipeline/step_flops.json``), so a config is counted once per machine. What is counted is what the counter knows (convolutions, matmuls,
attention; norms and activations are not): the same count as benchmarks/unet_bench.py's, and as torchtitan's
MFU, which counts matmuls.

``peak_tflops(name, precision)`` is the dense (not 2:4-sparse) peak of the GPUs we know from NVIDIA's data
sheets, in TFLOP/s: bf16/fp16 tensor cores, TF32 tensor cores, or FP32 CUDA cores (``train.tf32=false`` and no
autocast); None for a GPU not in the table (``train.peak_tflops`` gives it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.files import JSON_MAX_BYTES, read_json

# name fragment (lower case, as torch.cuda.get_device_name() spells it) -> dense TFLOP/s by precision
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # H200 SXM (H100 SXM's compute)
    "h100 pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "h100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5 ("NVIDIA H100 80GB HBM3")
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "l40s": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "a10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "l4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
}


def precision_of(tc: Any) -> str:
    """The precision the step's matmuls and convolutions run in: bf16/fp16 autocast, else TF32 or FP32."""
    if tc.mixed_precision in ("bf16", "fp16"):
        return tc.mixed_precision
    return "tf32" if tc.tf32 else "fp32"


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of one GPU named ``device_name`` at ``precision``; None when it is not in the table."""
    name = device_name.lower()
    for fragment, peaks in PEAK_TFLOPS.items():  # the more specific fragments come first
        if fragment in name:
            return peaks[precision]
    return None


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-pipeline" / "step_flops.json"


def step_flops_per_image(cfg: Any) -> float:
    """FLOPs of one training step (forward + backward) per image of the configured U-Net and diffusion (cached)."""
    key = hashlib.sha256(json.dumps([asdict(cfg.model), asdict(cfg.diffusion), torch.__version__],
                                    sort_keys=True).encode()).hexdigest()
    path = _cache_file()
    try:
        known = read_json(path, max_bytes=JSON_MAX_BYTES, what="FLOP count cache")
        if isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError, AttributeError):
        known = {}
    flops = count_step_flops(cfg)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run a recount
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: flops}))
        os.replace(tmp, path)
    return flops


def count_step_flops(cfg: Any) -> float:
    """step_flops_per_image without the cache."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.model.unet import UNet

    m = cfg.model
    diffusion = Diffusion(cfg.diffusion)  # its schedules are host float64 numbers, not module state
    with torch.device("meta"):
        loss_fn = DDPMLoss(UNet(m), diffusion)
        x = torch.zeros(1, m.channels, m.image_size, m.image_size)
        t = torch.zeros(1, dtype=torch.int64)
        noise = torch.zeros_like(x)
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(x, t, noise)
        loss.mean().backward()
    return float(counter.get_total_flops())


def utilisation(flops_per_image: float, images_per_s: float, world_size: int,
                peak: float | None) -> dict[str, float]:
    """The tick's achieved TFLOP/s per device and, where the peak is known, MFU (fraction of the peak)."""
    per_device = flops_per_image * images_per_s / world_size / 1e12
    out = {"train/tflops_per_device": per_device}
    if peak:
        out["train/mfu"] = per_device / peak
    return out
