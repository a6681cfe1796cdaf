"""A new user's own images: geometry from the data, refusals before anything is created, the small things
(ETA, closing summary, "already finished", the CPU 2-process accelerate config)."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.train.step import cpu_has_bf16_units
from tests.helpers import trainer as h
from tests.helpers.trainer import ACCELERATE, PY, REPO, env, free_port, run

TRAIN = [PY, str(REPO / "launch" / "train.py")]
# Small and fast whatever the geometry: one level, no attention beyond the rule's, 2 steps a tick.
SMALL = [
    "model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.dropout=0.0",
    "diffusion.timesteps=50", "data.num_workers=0", "data.shuffle_buffer=20", "train.batch_size=8",
    "train.total_steps=4", "optimizer.warmup_steps=0", "logging.every_steps=2", "logging.sample_every_steps=0",
    "checkpoint.every_steps=2",
]  # fmt: skip


def write_photos(folder: Path, n: int = 24, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """A folder of RGB PNGs in two class folders (coloured discs on noise), of a size prepare must crop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(n):
        label = ("red", "blue")[i % 2]
        img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
        cy, cx, r = rng.integers(12, 28), rng.integers(12, 36), rng.integers(6, 12)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[disc] = (220, 40, 40) if label == "red" else (40, 40, 220)
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / label / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def rgb16(tmp_path_factory) -> Path:
    """Prepared 16x16 RGB shards of a generated photo folder (with a test split)."""
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("own")
    out = root / "mine"
    prepare(str(write_photos(root / "photos")), str(out), resolution=16, test_fraction=0.25, workers=1,
            progress=False)
    return out


def _runs_in(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


def test_the_digits_config_trains_on_rgb_images_with_the_geometry_of_the_data(rgb16, tmp_path):
    out, db = tmp_path / "run", tmp_path / "store" / "mlflow.db"
    r = run([*TRAIN, "--config", str(REPO / "configs" / "digits.yaml"), *SMALL, f"data.shards={rgb16}",
             f"train.out_dir={out}", f"tracking.uri=sqlite:///{db}", "logging.sample_every_steps=4",
             "logging.sample_grid_images=4", "logging.sample_ddim_steps=2"], env())
    assert r.returncode == 0, r.stdout + r.stderr
    # the sample grid beside a grid of as many real images, both enlarged to a readable width
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    pngs = {a.path.split("+")[0]: a.path for a in client.list_artifacts(mlflow_run.info.run_id, "images")
            if a.path.endswith(".png")}
    assert set(pngs) == {"images/samples~ema", "images/samples~real"}
    for path in pngs.values():
        local = client.download_artifacts(mlflow_run.info.run_id, path, str(tmp_path))
        assert Image.open(local).size == (2 * 16 * 8 + 3 * 2,) * 2  # 2x2 grid of 16 px images enlarged 8x
    from pipeline.checkpoint.folder import Checkpoint

    model = Checkpoint(out / "step-00000004").config().model
    # taken from the manifest; attention by the rule: the U-Net's levels are 16 and 8, so 16x16
    assert (model.image_size, model.channels, model.attn_resolutions) == (16, 3, [16])
    # the log line has elapsed time and an ETA; the closing summary says what to run next
    ticks = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    # the tick ends with the elapsed time, the ETA and the achieved TFLOP/s (on a CPU no peak, so no MFU)
    assert len(ticks) == 2 and all(re.search(r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d  [\d.]+(e-\d+)? TFLOP/s/device$",
                                             t) for t in ticks)
    assert "eta 0:00:00  " in ticks[-1]
    assert "finished: 4 steps this job (step 0 -> 4 of 4)" in r.stdout
    assert f"evaluate it: python -m evaluation.evaluate --checkpoint {out / 'step-00000004'}" in r.stdout

    # A rerun on the finished out_dir says so, creates no run and writes no checkpoint
    runs_before, ckpts_before = _runs_in(db), sorted(p.name for p in out.glob("step-*"))
    again = run([*TRAIN, "--config", str(REPO / "configs" / "digits.yaml"), *SMALL, f"data.shards={rgb16}",
                 f"train.out_dir={out}", f"tracking.uri=sqlite:///{db}"], env())
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished at step 4 (train.total_steps=4" in again.stdout
    assert "Raise train.total_steps to train on" in again.stdout
    assert _runs_in(db) == runs_before == 1 and sorted(p.name for p in out.glob("step-*")) == ckpts_before


@pytest.mark.parametrize(("overrides", "needles"), [
    (["model.image_size=8"], ["model.image_size=8", "is 16x16 RGB", "set model.image_size=16"]),
    (["model.channels=1"], ["model.channels=1", "is 16x16 RGB", "set model.channels=3"]),
    (["model.image_size=32", "model.channels=1"],
     ["model.image_size=32, model.channels=1", "set model.image_size=16 and model.channels=3"]),
])  # fmt: skip
def test_a_geometry_mismatch_is_refused_before_anything_is_created(rgb16, tmp_path, overrides, needles):
    out, db = tmp_path / "run", tmp_path / "store" / "mlflow.db"
    r = run([*TRAIN, "--config", str(REPO / "configs" / "digits.yaml"), *SMALL, f"data.shards={rgb16}",
             f"train.out_dir={out}", f"tracking.uri=sqlite:///{db}", *overrides], env())
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not db.parent.exists()  # no out_dir, no MLflow store, no run


def test_shards_without_a_manifest_need_the_geometry_set(rgb16, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in rgb16.glob("train-*.tar"):
        shutil.copy(tar, bare / tar.name)
    pattern = str(bare / "train-{000000..000000}.tar")
    base = [*TRAIN, "--config", str(REPO / "configs" / "digits.yaml"), *SMALL, f"data.shards={pattern}",
            "data.mode=resampled", f"train.out_dir={tmp_path / 'run'}", "tracking.enabled=false"]
    r = run(base, env())
    assert r.returncode == 2 and "model.image_size and model.channels are not set" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    r = run([*base, "model.image_size=16", "model.channels=3", "train.total_steps=2"], env())
    assert r.returncode == 0, r.stdout + r.stderr


def test_cpu_2proc_config_starts_two_processes_without_an_environment_variable(rgb16, tmp_path):
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), str(REPO / "launch" / "train.py"),
           "--config", str(REPO / "configs" / "digits.yaml"), *SMALL, f"data.shards={rgb16}", "train.total_steps=2",
           f"train.out_dir={tmp_path / 'run'}", "tracking.enabled=false"]
    r = run(cmd, env())  # env() drops every ACCELERATE_* variable
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training: world 2, micro batch 4" in r.stdout
    # and a real DDP run: the same weights as the documented launch with ACCELERATE_USE_CPU=1 (once, this config
    # gave two independent trainings: a process group, but no gradient all-reduce and no-op barriers)
    ref = [c.replace(str(tmp_path / "run"), str(tmp_path / "ref")) for c in cmd]
    r = run(ref, env(ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (h.params(tmp_path / d / "step-00000002") for d in ("run", "ref"))
    assert h.same(a, b)
    assert sorted(p.name for p in (tmp_path / "run" / "step-00000002" / "accelerate").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def _tick_losses(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+/\d+  loss ([\d.]+)", stdout, flags=re.M)]


@pytest.mark.slow
def test_bf16_gradient_all_reduce_follows_the_fp32_loss_curve(tmp_path):
    """train.grad_comm_dtype=bf16 (DDP's bf16 compression hook over gloo): same data, same seeds, 2 processes;
    the loss curve stays within 2% of the fp32 reduction's (it rounds the averaged gradient to 8 bits of mantissa)."""
    from tests.helpers.trainer import launch_env, prepare_digits, train_cmd

    shards = prepare_digits(tmp_path / "digits")
    curves = {}
    for dtype in ("fp32", "bf16"):
        r = run(train_cmd([f"data.shards={shards}", f"train.out_dir={tmp_path / dtype}", "train.total_steps=12",
                           "train.deterministic=false", f"train.grad_comm_dtype={dtype}"], nproc=2),
                launch_env(multi=True), timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        curves[dtype] = _tick_losses(r.stdout)
    assert len(curves["fp32"]) == len(curves["bf16"]) == 6
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.02)
    from pipeline.checkpoint.folder import Checkpoint

    w32, w16 = (Checkpoint(tmp_path / d / "step-00000012").ema_weights() for d in ("fp32", "bf16"))
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # the hook was on: the reduction did round


# ------------------------------------------------------------------------------- the README's walk, as written

WALK_FAST = {  # appended to the README's commands: the same walk in seconds instead of an hour
    "launch/train.py": ["train.total_steps=4", "train.batch_size=8", "logging.every_steps=2",
                        "checkpoint.every_steps=2", "logging.sample_every_steps=4", "logging.sample_grid_images=4",
                        "logging.sample_ddim_steps=2", "data.num_workers=0"],
    # eval.num_samples stays the preset's 1000: with no feature extractor only the grid's 8 are sampled
    "evaluation.evaluate": ["eval.feature_extractor=none", "eval.steps=3", "eval.batch_size=8",
                            "eval.bpd_max_images=4", "eval.bpd_timesteps=2", "eval.grid_images=8", "eval.device=cpu"],
}  # fmt: skip


def readme_walk() -> list[str]:
    """The commands of the README's "Your own images" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_walk_on_a_folder_of_rgb_images(tmp_path):
    """prepare -> train (two runs) -> evaluate each -> compare, with the README's commands as written, in a fresh
    project folder holding a generated folder of RGB photos (`my_images`)."""
    project = tmp_path / "project"
    project.mkdir()
    for entry in REPO.iterdir():  # the clone, without anything an earlier run left in data/ or runs/
        if entry.name not in {"data", "runs", ".git", ".pytest_cache", ".ruff_cache"}:
            (project / entry.name).symlink_to(entry)
    write_photos(project / "my_images", n=40, size=(40, 48))
    walk = readme_walk()
    assert [c.split()[1] if c.split()[1] != "-m" else c.split()[2] for c in walk] == [
        "pipeline.data.prepare", "launch/train.py", "launch/train.py", "evaluation.evaluate", "evaluation.evaluate",
        "evaluation.compare"]
    outputs = []
    for command in walk:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/python"
        argv[0] = PY  # the interpreter running these tests (the README's .venv in CI)
        argv += next((extra for key, extra in WALK_FAST.items() if key in argv), [])
        r = run(argv, env(), timeout=600, cwd=project)
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs.append(r.stdout + r.stderr)

    prepared, train1, train2, eval1, eval2, compared = outputs
    assert "32x32x3" in prepared
    manifest = json.loads((project / "data" / "mine" / "manifest.json").read_text())
    assert (manifest["image_size"], manifest["channels"], manifest["num_classes"]) == (32, 3, 2)
    # the CPU preset's train.mixed_precision=auto decides by this CPU's flags, and says so
    ran = "bf16" if cpu_has_bf16_units() else "no"
    decided = f"train.mixed_precision=auto: {ran} (this CPU has"
    for out, name in ((train1, "mine"), (train2, "mine-lr5e-4")):
        assert "finished: 4 steps this job (step 0 -> 4 of 4)" in out
        assert decided in out, out[-2000:]
        saved = (project / "runs" / name / "step-00000004" / "config.yaml").read_text()
        assert f"mixed_precision: {ran}" in saved  # what ran, not "auto"
        assert (project / "runs" / name / "step-00000004" / "COMPLETE").is_file()
    for out, name in ((eval1, "mine"), (eval2, "mine-lr5e-4")):
        assert f"runs/{name} is a run folder; evaluating its newest complete checkpoint" in out
        figures = project / "runs" / name / "eval" / "step-00000004"
        assert (figures / "grid.png").is_file() and (figures / "real.png").is_file()
        assert "eval/bpd" in out
        # what was asked: the grid's 8 images, not eval.num_samples=1000, said before it starts
        provenance = json.loads((figures / "provenance.json").read_text())
        assert (provenance["num_samples"], provenance["seeds"]) == (8, "0..7")
        assert re.search(r"evaluate: 8 samples \(only the grid's: eval.feature_extractor=none\) \(DDIM, 3 steps: "
                         r"24 network evaluations\); bits/dim on 4 held-out images \(K=2 timesteps: 12 network "
                         r"evaluations\); about \d+ s on this process", out), out[-2000:]
    # one store for the project: both trainings, with their evaluations, are in runs/mlflow.db
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["mine", "mine-lr5e-4"]
    assert all("eval/bpd" in r.data.metrics for r in runs)
    assert "mine" in compared and "mine-lr5e-4" in compared
