"""The evaluation stage on tiny checkpoints: seeds → samples, figures into the training run, provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.evaluate import (
    EvaluationError,
    draw_samples,
    evaluate,
    held_out_batches,
    load_network,
    read_checkpoint,
    seed_block,
)
from evaluation.features import digits_extractor
from evaluation.fid import fid, load_reference
from pipeline.model.diffusion import Diffusion
from tests.helpers.data import free_port
from tests.helpers.evaluation import prepare_digits, tiny_config, training_run, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


def test_seed_blocks_partition_the_seeds():
    for n, w in [(10, 3), (7, 2), (2, 4), (64, 8)]:
        blocks = [list(seed_block(n, r, w)) for r in range(w)]
        assert sum(blocks, []) == list(range(n))


def test_held_out_batches_split_over_ranks_cover_the_split_once(digits):
    one = list(held_out_batches(digits, "test", 23, 4))
    assert [b["index"].tolist() for b in one] == [list(range(i, min(i + 4, 23))) for i in range(0, 23, 4)]
    shares = [list(held_out_batches(digits, "test", 23, 4, rank=r, world_size=3)) for r in range(3)]
    assert [len(x) for x in shares] == [2, 2, 2]  # batches 0,3 / 1,4 / 2,5
    merged = sorted((b for share in shares for b in share), key=lambda b: int(b["index"][0]))
    for a, b in zip(one, merged, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_bound_parts_that_overlap_are_refused():
    from pipeline.model.diffusion import PerImageBound, summarize_bound

    part = PerImageBound(index=torch.tensor([0, 1]), total=torch.ones(2, dtype=torch.float64),
                         prior=torch.zeros(2, dtype=torch.float64), decoder=torch.zeros(2, dtype=torch.float64),
                         term_sum=None, timesteps_k=4)
    assert summarize_bound([part]).bpd == 1.0
    with pytest.raises(ValueError, match="occurs twice"):
        summarize_bound([part, part])


def test_samples_do_not_depend_on_batch_size(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run", ["eval.num_samples=9"])
    ckpt = write_checkpoint(cfg, 10)
    net = load_network(ckpt, cfg, True, torch.device("cpu"))
    diffusion = Diffusion(cfg.diffusion)
    runs = []
    for bs in (2, 9, 4):
        cfg.eval.batch_size = bs
        images, _, _ = draw_samples(net, diffusion, cfg, torch.device("cpu"))
        runs.append(images)
    assert runs[0].shape == (9, 1, 8, 8) and runs[0].dtype == np.uint8
    assert runs[0].std() > 0
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    # only the grid's images travel to rank 0 when the others are not used: the first ones, the same images
    kept, _, _ = draw_samples(net, diffusion, cfg, torch.device("cpu"), keep_images=4)
    np.testing.assert_array_equal(kept, runs[0][:4])


def test_figures_land_in_the_training_run_at_each_checkpoint_step(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = training_run(uri)
    cfg = tiny_config(digits, tmp_path / "run")
    results = {}
    for step, seed in ((100, 1), (200, 2)):
        ckpt = write_checkpoint(cfg, step, seed=seed, run_id=run_id, tracking_uri=uri)
        results[step] = evaluate(ckpt)
        assert results[step].logged_to_run == run_id
    client = MlflowClient(uri)
    for key in ("eval/fid_digits", "eval/kid_digits", "eval/bpd"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert hist == [(s, pytest.approx(results[s].metrics[key], rel=1e-12)) for s in (100, 200)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the evaluation attaches; it never changes the run's status
    tags = run.data.tags
    assert tags["fid_protocol.digits.reference"] == "shards:train"
    assert tags["fid_protocol.digits.reference_count"] == "1617"
    assert tags["fid_protocol.digits.num_samples"] == "24"
    assert tags["fid_protocol.digits.sampler"] == "ddim" and tags["fid_protocol.digits.sampler_steps"] == "5"
    assert tags["fid_protocol.digits.weights"] == "ema" and tags["fid_protocol.digits.step"] == "200"
    assert tags["fid_protocol.digits.extractor_sha256"] == digits_extractor(torch.device("cpu")).weights_sha256
    arts = {a.path for a in client.list_artifacts(run_id, "eval/step-00000100")}
    assert arts == {"eval/step-00000100/grid.png", "eval/step-00000100/real.png", "eval/step-00000100/provenance.json"}
    local = client.download_artifacts(run_id, "eval/step-00000200/provenance.json", str(tmp_path))
    prov = json.loads(Path(local).read_text())
    assert prov == results[200].provenance and prov["mode"] == "digits" and prov["step"] == 200
    assert results[100].metrics["eval/fid_digits"] != results[200].metrics["eval/fid_digits"]


def test_reported_fid_is_the_fid_of_the_saved_samples(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run", ["eval.bpd_split=''"])
    ckpt = write_checkpoint(cfg, 50, seed=3)
    r = evaluate(ckpt, ["eval.num_samples=20"], save_samples_to=str(tmp_path / "s.npz"), log_to_run=False)
    with np.load(tmp_path / "s.npz") as z:
        images, seeds = z["images"], z["seeds"]
    assert images.shape == (20, 1, 8, 8) and list(seeds) == list(range(20))
    ex = digits_extractor(torch.device("cpu"))
    assert r.metrics["eval/fid_digits"] == pytest.approx(fid(ex(images), load_reference("train", digits, ex)), rel=1e-12)
    assert "eval/bpd" not in r.metrics
    assert (Path(r.out_dir) / "grid.png").is_file() and Path(r.out_dir) == tmp_path / "run" / "eval" / "step-00000050"
    # the PNG folder form holds the same images, named by seed
    evaluate(ckpt, ["eval.num_samples=3", "eval.bpd_split=''"], save_samples_to=str(tmp_path / "png"), log_to_run=False)
    from PIL import Image

    assert sorted(os.listdir(tmp_path / "png")) == [f"seed{i:08d}.png" for i in range(3)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "seed00000002.png")), images[2, 0])


def test_raw_weights_come_from_the_accelerate_state(digits, tmp_path):
    from safetensors.torch import save_file

    from tests.helpers.evaluation import tiny_weights

    cfg = tiny_config(digits, tmp_path / "run")
    ckpt = write_checkpoint(cfg, 10, seed=4)
    with pytest.raises(EvaluationError, match="model.safetensors"):
        load_network(ckpt, cfg, False, torch.device("cpu"))
    raw = tiny_weights(cfg, seed=5)
    (ckpt / "accelerate").mkdir()
    save_file({f"net.{k}": v for k, v in raw.items()}, str(ckpt / "accelerate" / "model.safetensors"))  # DDPMLoss.net
    net = load_network(ckpt, cfg, False, torch.device("cpu"))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)


def test_incomplete_checkpoint_and_missing_bpd_split_are_explained(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run")
    tmp = write_checkpoint(cfg, 30, complete=False)
    with pytest.raises(EvaluationError, match="no COMPLETE marker"):
        read_checkpoint(tmp)
    ckpt = write_checkpoint(tiny_config(digits, tmp_path / "run2"), 30)
    r = evaluate(ckpt, ["eval.num_samples=4", "eval.bpd_split=holdout"], log_to_run=False)
    assert "no split 'holdout'" in r.provenance["bpd"]["skipped"] and "eval/bpd" not in r.metrics


@pytest.mark.slow
def test_two_gloo_processes_draw_the_one_process_samples_and_figures(digits, tmp_path):
    # Sampling, sample features and bits/dim are all spread over the two processes and gathered on rank 0.
    cfg = tiny_config(digits, tmp_path / "run", ["eval.bpd_split=test", "eval.bpd_timesteps=4",
                                                 "eval.bpd_max_images=13", "eval.num_samples=11", "eval.batch_size=3"])
    ckpt = write_checkpoint(cfg, 70, seed=6)
    one = evaluate(ckpt, save_samples_to=str(tmp_path / "one.npz"), log_to_run=False, out_dir=str(tmp_path / "e1"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "evaluation.evaluate", "--checkpoint", str(ckpt),
           "--save-samples", str(tmp_path / "two.npz"), "--no-log", "--out", str(tmp_path / "e2")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["seeds"], b["seeds"])
    two = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    # features of the same images in other batch compositions: equal up to float rounding
    assert two["eval/fid_digits"] == pytest.approx(one.metrics["eval/fid_digits"], rel=1e-6)
    # bits/dim: each image keeps its generator (seed + its index) and its batch: the same per-image terms,
    # summed in index order, so the same figures
    assert (two["eval/bpd"], two["eval/bpd_se"]) == (one.metrics["eval/bpd"], one.metrics["eval/bpd_se"])
    assert one.provenance["bpd"]["num_images"] == 13
    assert json.loads((tmp_path / "e2" / "provenance.json").read_text())["world_size"] == 2
