"""Loader throughput from object storage vs local disk: decoded samples/s at 32x32 with 1-4 DataLoader workers.

    .venv/bin/python benchmarks/loader_s3_bench.py                  # writes benchmarks/loader_s3_results.md
    .venv/bin/python benchmarks/loader_s3_bench.py --samples 4000 --repeats 1 --print-only    # a quick check

The same PNG shards (natural-image crops, 32x32 RGB, written by prepare) are streamed by the training
loader (exact mode, shuffle block 1000, flips, data.verify=stream, batch 128) from three places:

* local disk;
* a local S3 server (moto's, on 127.0.0.1: tests/helpers/s3.py), through s3fs: range requests;
* the same server behind a proxy that holds every request for --latency-ms before passing it on, the
  round trip of a store in another data centre (S3 answers a GET's first byte in tens of ms).

Runs are interleaved, the order rotating every repeat, so load from other processes on the host hits all
alike; the table gives the median of the repeats. The rate counts from the second batch on (the first one
includes starting the workers). Each stream reads only its piece of each shard (prepare's sample index),
in requests of at most pipeline.data.tar.REMOTE_CHUNK bytes, so a worker waits one round trip per request,
about once per shard at 32x32; the other workers and the prefetched batches hide it if there are enough.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loader_bench import natural_crops
from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.prepare import prepare
from tests.helpers.s3 import AWS_VARIABLES_TO_CLEAR, FlakyProxy, start_s3_server

BATCH = 128
RESULTS = Path(__file__).with_name("loader_s3_results.md")


def rate(shards: str, workers: int, samples: int) -> float:
    """Decoded samples/s of one loader over `samples` samples, after its first batch."""
    cfg = DataConfig(shards=shards, num_workers=workers, shuffle_buffer=1000, hflip=True)
    loader = StreamingLoader(cfg, batch_size=BATCH)
    it = iter(loader)
    next(it)
    n = max(1, samples // BATCH - 1)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return n * BATCH / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=16000, help="samples in the data set (and streamed per run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="1,2,3,4", help="DataLoader workers per run, comma-separated")
    p.add_argument("--latency-ms", type=float, default=50.0, help="round trip added by the proxy")
    p.add_argument("--print-only", action="store_true", help="do not write benchmarks/loader_s3_results.md")
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose

    root = Path(tempfile.mkdtemp(prefix="loader-s3-"))
    src = root / "crops.npz"
    import numpy as np

    np.savez(src, images=natural_crops(a.samples, 32), labels=np.arange(a.samples) % 10)
    local = root / "shards"
    prepare(str(src), str(local), samples_per_shard=1000, workers=1, progress=False)
    size_mb = sum(f.stat().st_size for f in local.glob("*.tar")) / 1e6

    server = start_s3_server(root / "s3")
    proxy = FlakyProxy(server.port, delay_s=a.latency_ms / 1000)
    try:
        for k in AWS_VARIABLES_TO_CLEAR:
            os.environ.pop(k, None)
        os.environ.update(server.env())
        url = server.upload_folder(local, "s3://bench/c32")
        sources = {"local disk": (str(local), server.endpoint), "S3 (127.0.0.1)": (url, server.endpoint),
                   f"S3 + {a.latency_ms:.0f} ms": (url, proxy.endpoint)}
        runs: dict[tuple[str, int], list[float]] = {(s, w): [] for s in sources for w in workers}
        keys = list(runs)
        for r in range(a.repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order every repeat
                shards, endpoint = sources[key[0]]
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                runs[key].append(rate(shards, key[1], a.samples))
                print(f"repeat {r}: {key[0]:>16}, {key[1]} workers: {runs[key][-1]:8.0f} samples/s", flush=True)
    finally:
        proxy.close()
        server.stop()

    med = {k: statistics.median(v) for k, v in runs.items()}
    lines = [
        "| workers | " + " | ".join(sources) + " | "
        + " | ".join(f"{s} / local" for s in list(sources)[1:]) + " |",
        "| ---: |" + " ---: |" * (2 * len(sources) - 1),
    ]
    for w in workers:
        cells = [f"{med[(s, w)]:,.0f}" for s in sources]
        ratios = [f"{med[(s, w)] / med[('local disk', w)]:.2f}" for s in list(sources)[1:]]
        lines.append(f"| {w} | " + " | ".join(cells + ratios) + " |")
    every = [f"* {s}, {w} workers: " + ", ".join(f"{v:.0f}" for v in runs[(s, w)]) for s in sources for w in workers]
    load = os.getloadavg()
    text = "\n".join([
        "# Loader benchmark: object storage vs local disk (samples/s, 32x32)",
        "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} VM, no GPU, Python {platform.python_version()}; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) when it ended.",
        "",
        f"Command: `.venv/bin/python benchmarks/loader_s3_bench.py --samples {a.samples} --repeats {a.repeats} "
        f"--workers {a.workers} --latency-ms {a.latency_ms:g}`",
        "",
        f"{a.samples} PNG samples (natural-image crops, 32x32 RGB) in {a.samples // 1000} shards of 1000 "
        f"({size_mb:.0f} MB), batch 128, exact mode, shuffle block 1000, flips, data.verify=stream. Decoded "
        f"samples per second of wall clock, median of {a.repeats} interleaved repeats, from the second batch on.",
        "",
        *lines,
        "",
        "Every run (samples/s, in the order of the repeats):",
        "",
        *every,
        "",
    ])
    print(text)
    if not a.print_only:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
