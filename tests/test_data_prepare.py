"""prepare: every source, the manifest, determinism, refusal and unreadable-input handling."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import read_manifest, sha256_file, verify
from pipeline.data.prepare import main, prepare
from tests.helpers.data import cifar_rows_to_hwc, indexed_images, write_cifar10, write_cifar100


def read_samples(folder: str, split: str = "train") -> dict[str, tuple[np.ndarray, int | None]]:
    """key -> (uint8 image, label or None), read straight from the tars with tarfile and PIL."""
    with open(os.path.join(folder, "manifest.json")) as f:
        m = json.load(f)
    out: dict[str, list] = {}
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(os.path.join(folder, shard["name"])) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                entry = out.setdefault(key, [None, None])
                if ext == "png":
                    entry[0] = np.asarray(Image.open(io.BytesIO(data)))
                elif ext == "u8":
                    size, c = m["image_size"], m["channels"]
                    entry[0] = np.frombuffer(data, np.uint8).reshape(size, size, c).squeeze()
                else:
                    entry[1] = int(data)
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_digits_manifest_matches_files(tmp_path):
    from sklearn.datasets import load_digits

    out = str(tmp_path / "digits")
    m = prepare("digits", out, samples_per_shard=500, test_fraction=0.1, workers=2, progress=False)
    assert (m["image_size"], m["channels"], m["num_classes"]) == (8, 1, 10)
    assert m["splits"]["train"]["num_samples"] == 1617 and m["splits"]["test"]["num_samples"] == 180
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [500, 500, 500, 117]
    for split in ("train", "test"):
        for s in m["splits"][split]["shards"]:
            path = os.path.join(out, s["name"])
            assert sha256_file(path) == s["sha256"]
            with tarfile.open(path) as tf:
                assert len(tf.getmembers()) == 2 * s["num_samples"]  # png + cls per sample
    assert verify(read_manifest(out)) == []
    # pixels: 17 grey levels 0..16 scaled to 0..255 and rounded; the key is the source index
    d = load_digits()
    samples = read_samples(out, "test")
    assert len(samples) == 180
    for key, (image, label) in samples.items():
        i = int(key)
        np.testing.assert_array_equal(image, np.rint(d.images[i] * 255 / 16).astype(np.uint8))
        assert label == d.target[i]
    keys = set(read_samples(out, "train")) | set(samples)
    assert keys == {f"{i:08d}" for i in range(1797)}  # the split is a partition


def test_rerun_is_byte_identical(tmp_path):
    a = prepare("digits", str(tmp_path / "a"), samples_per_shard=400, test_fraction=0.2, workers=2, progress=False)
    b = prepare("digits", str(tmp_path / "b"), samples_per_shard=400, test_fraction=0.2, workers=1, progress=False)
    assert a["splits"] == b["splits"]  # names, counts and sha256 of every shard
    for s in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tf} == {(0, 0, 0, "", 0o644)}
    c = prepare("digits", str(tmp_path / "c"), samples_per_shard=400, test_fraction=0.2, seed=1, progress=False)
    assert c["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_cifar10_python_pickles(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar10(str(tmp_path / "cifar-10-batches-py"), per_batch=6)
    out = str(tmp_path / "out")
    m = prepare(str(tmp_path / "cifar-10-batches-py"), out, samples_per_shard=7, workers=1, progress=False)
    assert m["source"]["kind"] == "cifar10" and (m["image_size"], m["channels"]) == (32, 3)
    assert m["splits"]["train"]["num_samples"] == 30 and m["splits"]["test"]["num_samples"] == 6
    assert m["class_names"] == [f"class{i}" for i in range(10)] and m["num_classes"] == 10
    train_hwc = cifar_rows_to_hwc(train_x)
    for key, (image, label) in read_samples(out).items():
        np.testing.assert_array_equal(image, train_hwc[int(key)])  # keys number train then test items
        assert label == train_y[int(key)]
    test_hwc = cifar_rows_to_hwc(test_x)
    for key, (image, label) in read_samples(out, "test").items():
        np.testing.assert_array_equal(image, test_hwc[int(key) - 30])
        assert label == test_y[int(key) - 30]


def test_cifar100_python_pickles(tmp_path):
    train_x, fine = write_cifar100(str(tmp_path / "cifar-100-python"), n_train=9, n_test=4)
    out = str(tmp_path / "out")
    m = prepare(str(tmp_path / "cifar-100-python"), out, samples_per_shard=5, workers=1, progress=False)
    assert m["source"]["kind"] == "cifar100" and m["num_classes"] == 100
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [5, 4]
    train_hwc = cifar_rows_to_hwc(train_x)
    samples = read_samples(out)
    assert len(samples) == 9
    for key, (image, label) in samples.items():
        np.testing.assert_array_equal(image, train_hwc[int(key)])
        assert label == fine[int(key)]


def test_npz_npy_channels_resize_and_u8(tmp_path):
    images = indexed_images(12, size=16, channels=3)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(12) % 3)
    np.save(tmp_path / "b.npy", images)
    # npz, labels, u8 encoding: exact pixels
    m = prepare(str(tmp_path / "a.npz"), str(tmp_path / "a"), encoding="u8", workers=1, progress=False)
    assert (m["num_classes"], m["encoding"], m["image_size"]) == (3, "u8", 16)
    for key, (image, label) in read_samples(str(tmp_path / "a")).items():
        np.testing.assert_array_equal(image, images[int(key)])
        assert label == int(key) % 3
    # npy without labels, converted to grey and resized to 8: no cls members, pixels as PIL computes them
    m = prepare(str(tmp_path / "b.npy"), str(tmp_path / "b"), resolution=8, channels=1, workers=1, progress=False)
    assert (m["num_classes"], m["channels"], m["image_size"]) == (0, 1, 8)
    for key, (image, label) in read_samples(str(tmp_path / "b")).items():
        want = Image.fromarray(images[int(key)]).resize((8, 8), Image.Resampling.LANCZOS).convert("L")
        np.testing.assert_array_equal(image, np.asarray(want))
        assert label is None
    np.save(tmp_path / "f.npy", images.astype(np.float32))
    with pytest.raises(Exception, match="must be uint8"):
        prepare(str(tmp_path / "f.npy"), str(tmp_path / "f"), progress=False)


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_labels_crop_and_unreadable(tmp_path, capsys):
    src = tmp_path / "photos"
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high
    _png(str(src / "cat" / "a.png"), wide)
    _png(str(src / "cat" / "sub" / "b.png"), rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    _png(str(src / "dog" / "c.png"), rng.integers(0, 256, (30, 10), dtype=np.uint8))
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = str(tmp_path / "out")
    m = prepare(str(src), out, resolution=10, channels=3, workers=2, progress=False)
    assert m["class_names"] == ["cat", "dog"] and m["splits"]["train"]["num_samples"] == 3
    assert len(m["unreadable"]) == 1 and m["unreadable"][0]["input"].endswith("broken.png")
    samples = read_samples(out)
    labels = {int(k): v[1] for k, v in samples.items()}
    assert labels == {0: 0, 1: 0, 3: 1}  # sorted paths: cat/a, cat/sub/b, dog/broken (skipped), dog/c
    # shorter side to 10 (already), centre crop of the 20-wide image: columns 5..14
    np.testing.assert_array_equal(samples["00000000"][0], wide[:, 5:15])
    assert samples["00000003"][0].shape == (10, 10, 3)  # grey promoted to RGB
    code = main([str(src), "--out", str(tmp_path / "strict"), "--resolution", "10", "--strict", "--quiet"])
    assert code == 2
    # without --strict the CLI writes the shards but ends with status 3 and a last line naming the skip
    capsys.readouterr()
    code = main([str(src), "--out", str(tmp_path / "cli"), "--resolution", "10", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and (tmp_path / "cli" / "manifest.json").is_file()
    assert "SKIPPED 1 unreadable inputs" in err[-1] and "broken.png" in err[-1]


def test_refuses_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["digits", "--out", str(out), "--quiet"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["digits", "--out", str(out), "--quiet", "--overwrite", "--samples-per-shard", "1000"]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "train-000000.tar", "train-000001.tar",
                                      "train-index.safetensors"]
    assert main(["nothing-here", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
