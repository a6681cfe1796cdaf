"""Evaluation on the user's own images, right the first time: the digits net refused where it does not fit
(before sampling), its class figures only where it fits, readable grids beside real images (on disk and in
MLflow), a run folder as --checkpoint, and --help with the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluation.evaluate
from evaluation import digits_net
from evaluation.evaluate import check_fits, data_facts, evaluate, main, read_checkpoint
from pipeline.data.prepare import prepare
from pipeline.data.sequential import iter_split
from pipeline.tracking.images import image_grid
from tests.helpers.data import indexed_images, make_shards
from tests.helpers.evaluation import prepare_digits, tiny_config, training_run, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def rgb16(tmp_path_factory) -> str:
    """40 RGB 16x16 images labelled 0..9 (a user's own images), with a test split."""
    folder, _ = make_shards(str(tmp_path_factory.mktemp("rgb")), 40, per_shard=20, size=16, channels=3,
                            test_fraction=0.25)
    return folder


def _grey8(root: Path, name: str, labels: np.ndarray | None) -> str:
    """Grey 8x8 images like the digits' geometry, prepared from an .npz (not from the digits source)."""
    images = indexed_images(30, size=8, channels=1)
    src = root / f"{name}.npz"
    np.savez(src, images=images, **({"labels": labels} if labels is not None else {}))
    prepare(str(src), str(root / name), samples_per_shard=30, workers=1, progress=False)
    return str(root / name)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
    return lines[0]


@pytest.fixture
def no_sampling(monkeypatch) -> list:
    """Records any call of the sampler: a refusal must come before it."""
    calls: list = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("sampled although the evaluation should have been refused")

    monkeypatch.setattr(evaluation.evaluate, "draw_samples", spy)
    return calls


# ------------------------------------------------------------------------- the digits net where it fits


def test_digits_net_fit_rules():
    assert digits_net.misfit(8, 1, 10) == []
    assert digits_net.misfit(16, 1, 10, "digits") == []  # the digits prepared at 16 px: resized back inside
    assert digits_net.misfit(16, 1, 10, "npz") == ["images 16x16, not 8x8"]
    assert digits_net.misfit(32, 3, 100, "cifar100") == ["3 channels, not 1 (grey)", "images 32x32, not 8x8",
                                                         "100 classes, not 10 classes"]
    assert digits_net.misfit(8, 1, 0) == ["no labels, not 10 classes"]
    assert digits_net.misfit(8, 1, -1) == ["an unknown class count (no manifest.json), not 10 classes"]


def test_digits_extractor_is_refused_for_rgb_16px_before_sampling(rgb16, tmp_path, capsys, no_sampling):
    ckpt = write_checkpoint(tiny_config(rgb16, tmp_path / "run", ["model.image_size=16", "model.channels=3"]), 10)
    assert main(["--checkpoint", str(ckpt)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "eval.feature_extractor=digits" in line and rgb16 in line
    assert "3 channels, not 1 (grey); images 16x16, not 8x8;" in line
    assert "classes, not" not in line  # 10 labelled classes: that much fits
    assert line.rstrip().endswith("offline: eval.inception_weights=PATH)") and "eval.feature_extractor=inception" in line
    assert no_sampling == [] and not (tmp_path / "run" / "eval").exists()


def test_digits_extractor_is_refused_for_other_class_counts(tmp_path, capsys, no_sampling):
    for name, labels, said in [("four", np.arange(30) % 4, "4 classes, not 10 classes"),
                               ("unlabelled", None, "no labels, not 10 classes")]:
        ckpt = write_checkpoint(tiny_config(_grey8(tmp_path, name, labels), tmp_path / f"run-{name}"), 10)
        assert main(["--checkpoint", str(ckpt)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"differs: {said}; its FID" in line and "channels" not in line and "8x8, not" not in line
    assert no_sampling == []


def test_data_facts_come_from_the_checkpoint_and_the_manifest(digits, rgb16, tmp_path):
    cfg = read_checkpoint(write_checkpoint(tiny_config(digits, tmp_path / "a"), 10))[0]
    assert data_facts(cfg) == (8, 1, 10, "digits") and check_fits(cfg) is True
    rgb = tiny_config(rgb16, tmp_path / "b", ["model.image_size=16", "model.channels=3",
                                              "eval.feature_extractor=inception"])
    assert data_facts(rgb) == (16, 3, 10, "npz")
    # inception on data the digits classifier does not fit: no refusal, and no class figures
    assert check_fits(rgb) is False
    on_digits = tiny_config(digits, tmp_path / "c", ["eval.feature_extractor=inception"])
    assert check_fits(on_digits) is True  # the classifier fits the digits whatever extracts the FID features


def test_cleanfid_references_are_refused_before_sampling_where_they_cannot_apply(digits, tmp_path, capsys,
                                                                                   no_sampling):
    ckpt = write_checkpoint(tiny_config(digits, tmp_path / "run"), 10)
    # digits features against clean-fid's Inception statistics: refused when the config is read
    assert main(["--checkpoint", str(ckpt), "eval.reference=clean-fid:cifar10/train/32"]) == 2
    assert "needs eval.feature_extractor=inception" in _one_error_line(capsys.readouterr().err)
    # Inception, but statistics of 32x32 images for a model of 8x8 ones: refused before any weights are needed
    assert main(["--checkpoint", str(ckpt), "eval.feature_extractor=inception",
                 "eval.reference=clean-fid:cifar10/train/32"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds statistics of 32x32 images but this checkpoint makes 8x8 images" in line
    assert no_sampling == []


# ----------------------------------------------------------------------------------------------- grids


def test_image_grid_enlarges_by_the_smallest_integer_factor_with_nearest_neighbour():
    imgs = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    assert image_grid(imgs).shape == (82, 82, 3)  # unchanged without min_width: 8 * (8 + 2) + 2
    big = image_grid(imgs, min_width=256)
    assert big.shape == (274, 274, 3)  # factor 4: 8 * (32 + 2) + 2; factor 3 would give 210 < 256
    for i in (0, 9, 63):
        r, c = divmod(i, 8)
        tile = big[2 + r * 34: 2 + r * 34 + 32, 2 + c * 34: 2 + c * 34 + 32, 0]
        np.testing.assert_array_equal(tile, np.kron(imgs[i, 0], np.ones((4, 4), np.uint8)))  # 4x4 blocks
    assert set(np.unique(big)) <= set(np.unique(imgs)) | {0}  # no new pixel values
    def width(n: int, size: int, k: int) -> int:  # make_grid pads all but a single image
        return size * k if n == 1 else int(np.ceil(np.sqrt(n))) * (size * k + 2) + 2

    for n, size, k in [(1, 8, 32), (2, 16, 8), (9, 16, 6), (16, 32, 2), (9, 300, 1)]:
        assert image_grid(np.zeros((n, 3, size, size), np.uint8), min_width=256).shape[1] == width(n, size, k)
        assert width(n, size, k) >= 256 and (k == 1 or width(n, size, k - 1) < 256)  # the smallest wide enough


def test_sample_and_real_grids_on_disk_and_in_the_mlflow_run(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = training_run(uri)
    cfg = tiny_config(digits, tmp_path / "run", ["eval.bpd_split=''"])  # grid_images=16 of 24 samples
    ckpt = write_checkpoint(cfg, 40, run_id=run_id, tracking_uri=uri)
    r = evaluate(ckpt, save_samples_to=str(tmp_path / "s.npz"))
    assert r.logged_to_run == run_id
    out = Path(r.out_dir)
    with np.load(tmp_path / "s.npz") as z:
        samples = z["images"]
    real = np.stack([s.image for s in iter_split(digits, "train", 16)])  # the reference split, manifest order
    for name, images in (("grid.png", samples[:16]), ("real.png", real)):
        on_disk = np.asarray(Image.open(out / name).convert("RGB"))
        assert on_disk.shape == (266, 266, 3)  # 16 8x8 images, 4 per row, enlarged 8x: 4 * (64 + 2) + 2
        np.testing.assert_array_equal(on_disk, image_grid(images, min_width=256))
        np.testing.assert_array_equal(on_disk[2:66, 2:66, 0], np.kron(images[0, 0], np.ones((8, 8), np.uint8)))
    assert r.grids == {"samples": str(out / "grid.png"), "real": str(out / "real.png")}
    assert "the first 16 images of split 'train' (the reference split)" in r.real_grid_note

    client = MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(run_id, "eval/step-00000040")}
    assert arts == {"eval/step-00000040/grid.png", "eval/step-00000040/real.png", "eval/step-00000040/provenance.json"}
    for name in ("grid.png", "real.png"):
        logged = client.download_artifacts(run_id, f"eval/step-00000040/{name}", str(tmp_path / "dl"))
        assert Path(logged).read_bytes() == (out / name).read_bytes()
    assert json.loads((out / "metrics.json").read_text())["classifier"]["class_histogram"] == \
        r.classifier["class_histogram"] and sum(r.classifier["class_histogram"]) == 24


# ------------------------------------------------------------------------------ a run folder as --checkpoint


def test_run_folder_evaluates_its_newest_complete_intact_checkpoint(digits, tmp_path, capsys):
    from pipeline.data.manifest import sha256_file

    run = tmp_path / "run"
    cfg = tiny_config(digits, run, ["eval.num_samples=4", "eval.bpd_split=''", "eval.kid_subset_size=2"])
    write_checkpoint(cfg, 10)
    newest = write_checkpoint(cfg, 20, seed=1)
    write_checkpoint(cfg, 30, complete=False)  # being written: not a candidate
    assert main(["--checkpoint", str(run), "--no-log"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{run} is a run folder; evaluating its newest complete checkpoint {run}/step-00000020" in out
    assert (run / "eval" / "step-00000020" / "metrics.json").is_file() and not (run / "eval" / "step-00000010").exists()

    # the newest one's weights no longer match the sha256 recorded at save: the next older one is evaluated
    meta = json.loads((newest / "meta.json").read_text())
    meta["sha256"] = {"ema.safetensors": sha256_file(str(newest / "ema.safetensors"))}
    (newest / "meta.json").write_text(json.dumps(meta))
    with open(newest / "ema.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert main(["--checkpoint", str(run), "--no-log"]) == 0
    captured = capsys.readouterr()
    assert f"{run}/step-00000020 fails verification: ema.safetensors has sha256" in captured.err
    assert f"evaluating its newest complete checkpoint {run}/step-00000010" in captured.out
    assert (run / "eval" / "step-00000010" / "metrics.json").is_file()


def test_run_folder_without_a_complete_checkpoint_exits_2(digits, tmp_path, capsys):
    run = tmp_path / "run"
    write_checkpoint(tiny_config(digits, run), 10, complete=False)
    assert main(["--checkpoint", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run} holds no complete checkpoint" in line and f"--watch {run}" in line


def test_evaluate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--poll-s POLL_S --watch: seconds between scans of the folder (default: 60.0)" in out
    assert "(default: 60)" in out and "(0 = wait for ever) (default: 0.0)" in out  # --claim-stale-s, --max-wait-s
    assert "(default: None)" not in out and "(default: False)" not in out


# ------------------------------------------------------------------ class figures only where the net fits


def test_no_extractor_on_rgb_data_gives_bits_per_dim_and_grids_and_no_class_figures(rgb16, tmp_path):
    """eval.feature_extractor=none (offline without InceptionV3): no FID/KID, no reference statistics, no class
    figures for data the digits classifier does not fit; bits/dim and both grids as usual."""
    cfg = tiny_config(rgb16, tmp_path / "run", ["model.image_size=16", "model.channels=3",
                                                "eval.feature_extractor=none", "eval.num_samples=8",
                                                "eval.bpd_split=test", "eval.grid_images=8"])
    r = evaluate(write_checkpoint(cfg, 10), log_to_run=False)
    assert set(r.metrics) == {"eval/sampling_images_per_s", "eval/bpd", "eval/bpd_se"}
    assert 0 < r.metrics["eval/bpd"] < 20 and r.provenance["extractor"] == "none"
    assert r.classifier == {} and json.loads((Path(r.out_dir) / "metrics.json").read_text())["classifier"] == {}
    assert not (Path(rgb16) / "fid_stats").exists()  # no reference statistics were computed
    text = evaluation.evaluate.format_result(r)
    assert "FID/KID: not computed (eval.feature_extractor=none)" in text and "digits classifier" not in text
    # 8 RGB 16x16 images, 3 per row, enlarged 6x: 3 * (96 + 2) + 2 = 296 px, the real grid alike
    for name in ("grid.png", "real.png"):
        assert Image.open(Path(r.out_dir) / name).size == (296, 296)
