"""Choosing the EMA after training, end to end on the real digits: a short training keeps a second classic EMA and
EDM2's two power-function EMAs with snapshots; ``evaluate --ema all --posthoc-sigma-rels`` logs one FID per EMA
length into the training's MLflow run (eval/ema/<name>/...), and ``compare`` tabulates FID against sigma_rel and
names the best EMA, with a plot."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import weights
from pipeline.checkpoint.folder import Checkpoint
from tests.helpers import trainer as h

pytestmark = pytest.mark.slow

STEPS = 40
EVAL = ["eval.feature_extractor=digits", "eval.num_samples=48", "eval.steps=4", "eval.batch_size=48",
        "eval.kid_subsets=4", "eval.kid_subset_size=24", "eval.grid_images=16", "eval.device=cpu"]


def _py(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return h.run([h.PY, *args], h.env(), timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    shards = h.prepare_digits(root / "shards")
    run = root / "runs" / "digits-ema"
    r = h.run(h.train_cmd([f"data.shards={shards}", f"train.out_dir={run}", f"train.total_steps={STEPS}",
                           "checkpoint.every_steps=20", "checkpoint.keep=1", "ema.decays=[0.8]",
                           "ema.posthoc.sigma_rels=[0.05,0.1]", "ema.posthoc.snapshot_every_steps=10",
                           "tracking.enabled=true", "name=digits-ema"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    return root, shards, run


def test_the_sweep_logs_one_fid_per_ema_length_and_compare_names_the_best(trained):
    root, shards, run = trained
    r = _py(["-m", "evaluation.evaluate", "--checkpoint", str(run), "--ema", "all", "--posthoc-sigma-rels",
             "0.03:0.2:4", f"data.shards={shards}", *EVAL])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = Checkpoint(run / f"step-{STEPS:08d}")
    want = {"decay0.9": "primary", "decay0.8": "classic", "sigma0.05": "power", "sigma0.1": "power",
            "sigma0.03": "posthoc", "sigma0.0565": "posthoc", "sigma0.106": "posthoc", "sigma0.2": "posthoc"}

    # the printed curve: every EMA once, shortest first, and the best named
    table = r.stdout[r.stdout.index("FID vs EMA length"):]
    printed = re.findall(r"^  (\S+)\s+(primary|classic|power|posthoc)\s+([\d.]+)\s+([\d.]+)$", table, re.M)
    assert {name: kind for name, kind, _, _ in printed} == want
    sigmas = [float(s) for _, _, s, _ in printed]
    assert sigmas == sorted(sigmas)
    fids = {name: float(f) for name, _, _, f in printed}
    best = min(fids, key=fids.get)
    assert re.search(rf"^best: {best} \(", table, re.M)

    # MLflow: the training's one run holds one FID per EMA at the checkpoint's step, with its sigma_rel and kind
    client = MlflowClient(f"sqlite:///{run.parent}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "ddpm"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    rid = mlrun.info.run_id
    for name, kind in want.items():
        (fid,) = client.get_metric_history(rid, f"eval/ema/{name}/fid_digits")
        (sigma,) = client.get_metric_history(rid, f"eval/ema/{name}/sigma_rel")
        assert fid.step == sigma.step == STEPS and round(fid.value, 4) == fids[name]
        assert mlrun.data.tags[f"ema_sweep.{name}.kind"] == kind
        assert [a.path for a in client.list_artifacts(rid, f"eval/step-{STEPS:08d}/ema-{name}")] == [
            f"eval/step-{STEPS:08d}/ema-{name}/{f}" for f in ("grid.png", "provenance.json", "real.png")]
    primary = next(c for c in weights.stored_emas(ckpt) if c.kind == "primary")
    assert client.get_metric_history(rid, "eval/ema/decay0.9/sigma_rel")[0].value == pytest.approx(primary.sigma_rel)
    assert mlrun.data.tags["ema_sweep.fid_protocol.digits.num_samples"] == "48"
    assert "eval/fid_digits" not in mlrun.data.metrics  # the primary EMA's own curve is not touched by a sweep
    assert not any(k.startswith("eval/ema/") and k.endswith("/bpd") for k in mlrun.data.metrics)  # skipped

    # compare: the table per checkpoint, the run's best EMA, the plot
    out = root / "compare"
    c = _py(["-m", "evaluation.compare", "--experiment", "ddpm", "--tracking-uri", f"sqlite:///{run.parent}/mlflow.db",
             "--out", str(out)])
    assert c.returncode == 0, c.stderr[-3000:]
    rows = re.findall(rf"^digits-ema\s+{STEPS}\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s*(\*?)$", c.stdout, re.M)
    assert {name: float(f) for name, _, _, f, _ in rows} == fids
    assert [name for name, *_, mark in rows if mark] == [best]
    assert re.search(rf"^best EMA of digits-ema: {best} \(", c.stdout, re.M)
    assert (out / "fid_vs_ema.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isfinite(v) for v in fids.values())


def test_bad_sweep_requests_exit_2_with_one_line(trained):
    _, shards, run = trained
    for args, message in [(["--ema", "decay0.5"], "--ema 'decay0.5'"),
                          (["--posthoc-sigma-rels", "0.5:0.6:2"], "must lie in (0, 0.2887)"),
                          (["--posthoc-sigma-rels", "0.03:0.1"], "write LO:HI:N")]:
        r = _py(["-m", "evaluation.evaluate", "--checkpoint", str(run), *args, f"data.shards={shards}", *EVAL])
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("evaluate: error:")]
        assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
