"""`make demo` end to end (launch/demo.py), shortened by overrides: prepare, train, evaluate, log."""

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import trainer as h

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_demo_prepares_trains_evaluates_and_logs_into_the_run(tmp_path):
    data, run = tmp_path / "digits", tmp_path / "run"
    overrides = [
        f"train.out_dir={run}", "train.total_steps=40", "checkpoint.every_steps=40", "logging.every_steps=20",
        "logging.sample_every_steps=0", "data.num_workers=0", "diffusion.timesteps=100",
        "eval.num_samples=64", "eval.steps=5", "eval.bpd_max_images=16", "eval.bpd_timesteps=4",
        "eval.kid_subsets=10", "eval.kid_subset_size=32",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the project's store, as a user's
    proc = h.run([sys.executable, "-m", "launch.demo", "--data", str(data), *overrides], env, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

    # the data: 1797 digits, 10% held out
    assert "'train': 1617" in out and "'test': 180" in out

    # the figures table: generated vs held-out real, on the same protocol
    fid_gen, fid_gen_n, fid_real = map(float, _row(out, "FID (digits-cnn-v1)"))
    assert math.isfinite(fid_gen) and fid_real >= 0
    assert fid_real < fid_gen_n  # 40 steps of training are far from the data; real test digits are not
    shares = list(map(float, _row(out, "confident (p >= 0.9)")))
    assert all(0 <= x <= 1 for x in shares) and shares[2] > 0.9  # the classifier knows real digits (98.9%)
    hist_line = next(line for line in out.splitlines() if line.startswith("class histogram"))
    hist_real = json.loads(re.findall(r"\[[\d, ]+\]", hist_line)[2])
    assert sum(hist_real) == 180
    bpd = float(re.search(r"bits/dim \(the model's variational bound on the 180 test digits\): (\S+)", out).group(1))
    assert 0 < bpd < 20

    # where the grid is, and that it is a PNG
    grid = Path(re.search(r"sample grid:\s+(\S+)", out).group(1))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # everything landed in the one training run of the project's store (beside out_dir), at the checkpoint's step
    client = MlflowClient(tracking_uri=f"sqlite:///{run.parent}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "ddpm"]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    (fid_metric,) = client.get_metric_history(r.info.run_id, "eval/fid_digits")
    assert fid_metric.step == 40 and round(fid_metric.value, 3) == fid_gen
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [20, 40]
