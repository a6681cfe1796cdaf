"""DDP vs DeepSpeed ZeRO-1/2/3 on 2 CPU processes (gloo), configs/digits.yaml: images/s and the EMA's share of a step.

    python benchmarks/zero_vs_ddp.py                       # 120 steps, ticks at 40/80/120, every mode
    python benchmarks/zero_vs_ddp.py --steps 60 --log-every 20 --modes ddp,zero2
    python benchmarks/zero_vs_ddp.py --gpu --precision bf16 --steps 600 --log-every 200   # on a GPU machine

``--gpu``: one process per visible GPU (NCCL), bf16 as the shipped configs; the EMA and step-window times are
then host times (the kernels run asynchronously), which is the cost this table is about on a GPU.

- images/s: launch/train.py's own tick lines (``step N/M ... X img/s``), one number per tick; the first tick
  (start-up, first DeepSpeed steps) is shown but left out of the mean.
- EMA share: this script re-enters itself in each training process (``--worker``) and times, around
  launch/train.py, every ``EMA.update`` / ``PartitionedEMA.update`` call and every step window (loop hooks from
  ``step_begin`` to ``step_end``: data, forward, backward, optimizer step, EMA), after the first tick; on CPU the
  ops are synchronous, so the update's wall time is its cost. Reported for rank 0 (the ranks agree within noise).

Each mode is a real launch (``accelerate launch``), with one OpenMP thread per process; the machine should be
otherwise idle. Results: benchmarks/zero_results.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = re.compile(r"^step (\d+)/\d+ .*?([\d.]+) img/s", re.M)
MODES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, shards: Path, out: Path, steps: int, log_every: int, precision: str, gpus: int = 0) -> dict:
    stage = MODES[mode]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    nproc = gpus or 2
    common = ["--num_processes", str(nproc), "--num_machines", "1", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_port()), "--mixed_precision", precision, "--dynamo_backend", "no"]
    launcher = ([accelerate, "launch", "--use_deepspeed", "--zero_stage", str(stage),
                 "--gradient_accumulation_steps", "1", *common] if stage
                else [accelerate, "launch", *(["--multi_gpu"] if nproc > 1 else []), *common])
    overrides = [f"data.shards={shards}", f"train.out_dir={out / mode}", f"train.total_steps={steps}",
                 f"logging.every_steps={log_every}", "logging.sample_every_steps=0", "checkpoint.every_steps=100000",
                 "tracking.enabled=false", *([f"train.mixed_precision={precision}"] if precision != "no" else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DDPM_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", ZERO_BENCH_DIR=str(out / mode),
               ZERO_BENCH_SKIP=str(log_every), PYTHONPATH=str(REPO))
    if not gpus:
        env.update({"DS_ACCELERATOR": "cpu"} if stage else {"ACCELERATE_USE_CPU": "1"})
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", "--config", str(REPO / "configs" / "digits.yaml"),
           *overrides]
    (out / mode).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{mode}: the launch failed ({r.returncode}):\n{r.stderr[-3000:]}")
    ticks = [(int(s), float(v)) for s, v in TICK.findall(r.stdout)]
    timing = json.loads((out / mode / "bench-rank-0.json").read_text())
    return {"ticks": ticks, "wall_s": time.perf_counter() - t0, **timing}


def worker(argv: list[str]) -> int:
    """One training process: launch/train.py with the EMA update and the step window timed."""
    sys.path.insert(0, str(REPO))
    from launch.train import main
    from pipeline.train import ema
    from pipeline.train.hooks import LoopHooks

    skip, acc = int(os.environ["ZERO_BENCH_SKIP"]), {"ema_s": 0.0, "step_s": 0.0, "steps": 0}
    state = {"step": -1, "t0": 0.0}

    def timed_update(update):
        @functools.wraps(update)
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return update(self, *args, **kwargs)
            finally:
                if state["step"] >= skip:
                    acc["ema_s"] += time.perf_counter() - t0
        return wrapper

    for cls in (ema.EMA, ema.PartitionedEMA):
        cls.update = timed_update(cls.update)

    class StepTimer(LoopHooks):
        """The step window: from step_begin (before the data) to step_end (after the EMA update)."""

        def step_begin(self, step: int, first_step: int) -> None:
            state["step"], state["t0"] = step, time.perf_counter()

        def step_end(self, steps_done: int, first_step: int, ema: object) -> None:
            if steps_done - 1 >= skip:
                acc["step_s"] += time.perf_counter() - state["t0"]
                acc["steps"] += 1

    code = main(argv, hooks=StepTimer())
    rank = os.environ.get("RANK", "0")
    (Path(os.environ["ZERO_BENCH_DIR"]) / f"bench-rank-{rank}.json").write_text(json.dumps(acc))
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--log-every", type=int, default=40)
    p.add_argument("--modes", default="ddp,zero1,zero2,zero3")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--gpu", action="store_true", help="one process per visible GPU (NCCL) instead of 2 CPU processes")
    p.add_argument("--shards", default=str(REPO / "data" / "digits"), help="prepared digits (made if missing)")
    args = p.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or args.steps < 2 * args.log_every:
        print(f"error: --modes takes {','.join(MODES)} (got {unknown}); --steps must be at least 2 x --log-every",
              file=sys.stderr)
        return 2
    gpus = 0
    if args.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            print("error: --gpu: no CUDA device is visible", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="zero_vs_ddp-") as tmp:
        shards = Path(args.shards)
        if not (shards / "manifest.json").is_file() and not any(shards.glob("*.tar")):
            from pipeline.data.prepare import prepare

            shards = Path(tmp) / "digits"
            prepare("digits", str(shards), samples_per_shard=300, progress=False, workers=1)
        load = os.getloadavg()[0]
        rows = []
        for mode in modes:
            res = _launch(mode, shards, Path(tmp), args.steps, args.log_every, args.precision, gpus)
            later = [v for _, v in res["ticks"][1:]]
            share = res["ema_s"] / res["step_s"] if res["step_s"] else float("nan")
            rows.append((mode, " / ".join(f"{v:.0f}" for _, v in res["ticks"]), statistics.mean(later),
                         1e3 * res["step_s"] / max(res["steps"], 1), 1e3 * res["ema_s"] / max(res["steps"], 1), share))
    base = rows[0][2] if rows[0][0] == "ddp" else None
    where = f"{gpus} GPU process(es) (NCCL)" if gpus else "2 CPU processes (gloo)"
    print(f"{where}, configs/digits.yaml, {args.steps} steps, precision {args.precision}; "
          f"load average at start {load:.2f}, {os.cpu_count()} CPUs")
    print("| mode | img/s per tick | img/s (mean, later ticks) | vs DDP | step (ms, host) | EMA (ms) | EMA share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, ticks, mean, step_ms, ema_ms, share in rows:
        rel = f"{mean / base:.0%}" if base else "-"
        print(f"| {mode} | {ticks} | {mean:.0f} | {rel} | {step_ms:.1f} | {ema_ms:.2f} | {share:.1%} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
