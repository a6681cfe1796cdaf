"""Loader throughput: decoded samples/s of one worker process, ours vs webdataset's plain pipeline.

    .venv/bin/python benchmarks/loader_bench.py            # writes benchmarks/loader_results.md
    .venv/bin/python benchmarks/loader_bench.py --quick    # smaller sets, prints only

Both loaders run in this process (num_workers=0: one core) and in one DataLoader worker, on the same
local PNG shards written by prepare, batched by 128, interleaved (the order rotates every repeat) so
load from other processes on the host hits all alike; the tables report the median of the repeats. The
baseline is `wds.WebDataset(urls, shardshuffle=False).decode("torchrgb").to_tuple("png", "cls").batched(128)`;
ours additionally shuffles (the global order: windows of 1000) and flips, so the comparison is conservative. Ours runs with
each data.verify: stream (the default: every shard hashed as it is read), start (hashed when the loader
is constructed: that time is reported apart, the rates count from the first batch on) and off.

Two rates per run: wall-clock samples/s, and samples per CPU-second (this process and its DataLoader
worker, which is shut down before its time is read). On a host shared with other processes the wall
clock swings with their load; CPU time is what one core's worth of work buys, and holds still.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.prepare import prepare

BATCH = 128


def natural_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n RGB crops of skimage's bundled photos, resized to size (PNG-compressible like real images)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        c = int(rng.integers(64, min(p.shape[:2])))
        y, x = int(rng.integers(0, p.shape[0] - c + 1)), int(rng.integers(0, p.shape[1] - c + 1))
        out[i] = np.asarray(Image.fromarray(p[y:y + c, x:x + c]).resize((size, size), Image.Resampling.BICUBIC))
    return out


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (DataLoader workers once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(it, n_batches: int, samples) -> tuple[float, float]:
    """(wall samples/s, samples per CPU-second) of n batches after the first (opening the first shard)."""
    cpu = _cpu()
    next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    wall = time.perf_counter() - t
    assert samples(b) == BATCH
    del it, b
    gc.collect()  # shuts a DataLoader's worker down, so its CPU time is counted
    return n_batches * BATCH / wall, (n_batches + 1) * BATCH / (_cpu() - cpu)


def ours(folder: str, n_batches: int, workers: int, verify: str) -> tuple[float, float, float]:
    """(wall samples/s, samples per CPU-second, seconds the loader's constructor took)."""
    cfg = DataConfig(shards=folder, num_workers=workers, shuffle_buffer=1000, prefetch_factor=2,
                     verify=verify)
    t = time.perf_counter()
    loader = StreamingLoader(cfg, batch_size=BATCH)
    constructed = time.perf_counter() - t
    return (*_timed(iter(loader), n_batches, lambda b: b["image"].shape[0]), constructed)


def baseline(urls: list[str], n_batches: int, workers: int) -> tuple[float, float, float]:
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False).decode("torchrgb").to_tuple("png", "cls").batched(BATCH)
    source = ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    return (*_timed(iter(source), n_batches, lambda b: b[0].shape[0]), 0.0)


LOADERS = ["webdataset", "stream", "off", "start"]  # ours: by data.verify


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "loader_results.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    cases = [(32, 4000 if a.quick else 16000, 1000), (256, 768 if a.quick else 1536, 128)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, n, per_shard in cases:
            src = os.path.join(tmp, f"{size}.npz")
            np.savez(src, images=natural_crops(n, size), labels=np.arange(n) % 10)
            folder = os.path.join(tmp, f"s{size}")
            prepare(src, folder, samples_per_shard=per_shard, progress=False)
            urls = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
            megabytes = sum(os.path.getsize(u) for u in urls) / 1e6
            n_batches = n // BATCH - 2  # stay inside one pass for all
            for workers in (0, 1):
                runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in LOADERS}
                for r in range(a.repeats):
                    for k in LOADERS[r % 4:] + LOADERS[:r % 4]:
                        runs[k].append(baseline(urls, n_batches, workers) if k == "webdataset"
                                       else ours(folder, n_batches, workers, k))
                med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in runs.items()}
                rows.append((size, n, workers, megabytes, med, runs))
                print(f"{size}x{size} RGB, num_workers={workers}, {megabytes:.0f} MB of shards:", flush=True)
                for k in LOADERS:
                    print(f"  {k:10s} wall {med[k][0]:7,.0f}/s {[round(x[0]) for x in runs[k]]}  "
                          f"cpu {med[k][1]:7,.0f}/s {[round(x[1]) for x in runs[k]]}"
                          + (f"  constructor {med[k][2]:.3f} s" if k == "start" else ""), flush=True)
                ratio = {k: [med["stream"][i] / med[k][i] for i in range(2)] for k in ("webdataset", "off")}
                wds, off = ratio["webdataset"], ratio["off"]
                print(f"  stream/webdataset: wall {wds[0]:.2f}, cpu {wds[1]:.2f}; "
                      f"stream/off: wall {off[0]:.3f}, cpu {off[1]:.3f}", flush=True)
    if a.quick:
        return
    import PIL
    import webdataset

    lines = [
        "# Loader benchmark: decoded samples/s of one worker process",
        "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} VM, no GPU, Python {platform.python_version()}, "
        f"torch {torch.__version__.split('+')[0]}, webdataset {webdataset.__version__}, Pillow {PIL.__version__}. "
        f"The four loaders run interleaved, their order rotating every repeat ({a.repeats} repeats, median).",
        "",
        "Command: `.venv/bin/python benchmarks/loader_bench.py`",
        "",
        f"Local PNG shards written by `prepare` (natural-image crops), batch {BATCH}. `num_workers=0`: the "
        "pipeline runs in the measuring process (one core: what one worker does); `num_workers=1`: one DataLoader "
        "worker process, including the shared-memory transfer of each batch to the training process.",
        "Baseline: `wds.WebDataset(urls, shardshuffle=False).decode(\"torchrgb\").to_tuple(\"png\", \"cls\").batched(128)`. "
        "Ours: `StreamingLoader` in exact mode with the global order (shuffle windows of 1000) and random flips (more work than the "
        "baseline), by `data.verify`: `stream` (the default) hashes every shard as it reads it; `off` "
        "hashes nothing; `start` hashes every shard in the loader's constructor (that time is the last "
        "column; the rates start at the first batch).",
        "",
        "Samples per second of wall clock, and per CPU-second (this process and its DataLoader worker): on a "
        "loaded host the wall clock follows the other processes' load, CPU time measures the work.",
        "",
        "| images | samples | num_workers | measure | ours, stream | ours, off | ours, start | webdataset "
        "| stream / webdataset | stream / off | start: constructor |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, n, workers, megabytes, med, _ in rows:
        for i, measure in enumerate(("wall", "CPU")):
            lines.append(
                f"| {size}x{size} RGB | {n} | {workers} | {measure} | {med['stream'][i]:,.0f} | "
                f"{med['off'][i]:,.0f} | {med['start'][i]:,.0f} | {med['webdataset'][i]:,.0f} | "
                f"{med['stream'][i] / med['webdataset'][i]:.2f}x | {med['stream'][i] / med['off'][i]:.3f} | "
                + (f"{med['start'][2]:.2f} s for {megabytes:.0f} MB |" if i == 0 else " |"))
    lines += ["", "Target: >= 2x the baseline per core at 32x32 (per-sample overhead dominates there); at 256x256 "
              "PNG decoding (zlib, in Pillow) dominates both.", "",
              "Every run (wall samples/s / samples per CPU-s), in the order of the repeats:", ""]
    for size, _, workers, _, _, runs in rows:
        lines.append(f"* {size}x{size}, num_workers={workers}: " + "; ".join(
            f"{k} " + ", ".join(f"{x[0]:.0f}/{x[1]:.0f}" for x in runs[k]) for k in LOADERS))
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
