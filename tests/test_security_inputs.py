"""Inputs that must never run code or exhaust memory (docs/security.md): CIFAR pickles, the Inception weights,
decompression bombs in prepare and in a shard."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation import features
from evaluation.features import INCEPTION_FILE, InceptionWeightsUnavailable, inception_extractor
from pipeline.data.prepare import main as prepare_main
from pipeline.data.sources import MAX_PIXELS, open_source
from tests.helpers.bombs import bomb_png, peak_mb, plant_sample
from tests.helpers.data import cifar_rows_to_hwc, copy_folder, make_shards, write_cifar10
from tests.helpers.trainer import REPO, env

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- CIFAR pickles

class _Payload:
    """Unpickling this calls `fn(*args)`: what a crafted batch does to whoever reads it with pickle.load."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _crafted_cifar(folder, marker, payload: str) -> str:
    write_cifar10(str(folder), 4)
    fn, args = {
        "os.system": (os.system, (f"touch {marker}",)),
        "open": (builtins.open, (str(marker), "w")),
        "exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "numpy.savetxt": (np.savetxt, (str(marker), [1])),  # numpy, but not one of the names a batch holds
    }[payload]
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0, _Payload(fn, *args)]}
    path = folder / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return str(path)


def test_a_crafted_cifar_batch_runs_nothing_prepare_exits_2_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    path = _crafted_cifar(tmp_path / "cifar", marker, "os.system")
    r = subprocess.run([sys.executable, "-m", "pipeline.data.prepare", str(tmp_path / "cifar"), "--out",
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env(), cwd=REPO,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"prepare: error: {path} refused")
    assert "posix.system" in r.stderr and "download the 'python version' again" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("payload", ["open", "exec", "numpy.savetxt"])
def test_every_crafted_global_is_refused_before_it_runs(tmp_path, capsys, payload):
    marker = tmp_path / "marker"
    path = _crafted_cifar(tmp_path / "cifar", marker, payload)
    assert prepare_main([str(tmp_path / "cifar"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and "which a CIFAR batch never holds" in err
    assert not marker.exists()


def test_a_genuine_format_cifar_batch_still_loads(tmp_path):
    # the python-version files were pickled under numpy 1.x: their arrays name numpy.core.multiarray._reconstruct;
    # write_cifar10 pickles with today's numpy (numpy._core) and Python 3 (bytes as _codecs.encode): both admitted
    folder = tmp_path / "cifar"
    train_x, train_y, test_x, test_y = write_cifar10(str(folder), 5)
    raw = (folder / "data_batch_1").read_bytes()
    assert raw.count(b"numpy._core.multiarray") == 1
    (folder / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    src = open_source(str(folder))
    assert src.kind == "cifar10" and len(src.items) == 30 and src.class_names == [f"class{i}" for i in range(10)]
    np.testing.assert_array_equal(np.stack(src.items[:25]), cifar_rows_to_hwc(train_x))
    np.testing.assert_array_equal(np.stack(src.items[25:]), cifar_rows_to_hwc(test_x))
    assert src.labels == train_y + test_y


def test_a_batch_of_the_wrong_shape_is_refused_in_one_line(tmp_path, capsys):
    write_cifar10(str(tmp_path / "cifar"), 4)
    with open(tmp_path / "cifar" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    assert prepare_main([str(tmp_path / "cifar"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_batch lacks a CIFAR batch's uint8 (N, 3072)" in err


# ------------------------------------------------------------------------------------------ Inception weights

class _TinyInception(nn.Module):
    """A TorchScript file with the interface of clean-fid's Inception (`layers`, 2048 features): the real
    weights cannot be downloaded here, so the accepted file is this one, its digest pinned by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ts") / INCEPTION_FILE
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return str(path)


@pytest.fixture
def jit_loads(monkeypatch) -> list[str]:
    """Every path torch.jit.load is asked to read (the real function still reads it)."""
    calls, real = [], torch.jit.load

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    return calls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connecting is refused at once


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_planted_inception_file_is_refused_before_torch_jit_load(tmp_path, monkeypatch, torchscript_file,
                                                                     jit_loads):
    # a valid TorchScript file, but not clean-fid's: in the per-user cache, and named by eval.inception_weights
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "ddpm-pipeline" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    shutil.copyfile(torchscript_file, cached)
    pinned = features.PINNED_SHA256[INCEPTION_FILE]
    for weights, where in (("", str(cached)), (torchscript_file, f"eval.inception_weights={torchscript_file}")):
        with pytest.raises(InceptionWeightsUnavailable) as err:
            inception_extractor("clean", torch.device("cpu"), weights=weights)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{where} has sha256 {_sha256(torchscript_file)}")
        assert f"({pinned})" in msg and "download https://" in msg and "sha256sum" in msg
    assert jit_loads == []


def test_the_shared_tmp_folder_is_never_looked_in(tmp_path, monkeypatch, torchscript_file, jit_loads):
    # clean-fid's place, the system temp folder, holds a file that even matches the pinned digest: not taken
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shutil.copyfile(torchscript_file, shared / INCEPTION_FILE)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setitem(features.PINNED_SHA256, INCEPTION_FILE, _sha256(torchscript_file))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(InceptionWeightsUnavailable, match="could not be downloaded") as err:
        features.inception_weights_file(url=f"http://127.0.0.1:{_closed_port()}/{INCEPTION_FILE}")
    assert str(tmp_path / "cache" / "ddpm-pipeline" / INCEPTION_FILE) in str(err.value)
    assert str(shared) not in str(err.value) and jit_loads == []
    assert os.listdir(tmp_path / "cache" / "ddpm-pipeline") == []  # no partial download left behind


def test_a_planted_pytorch_fid_weights_pickle_runs_nothing(tmp_path, monkeypatch):
    """eval.fid_mode=legacy_pytorch: clean-fid loads pytorch-fid's weights from torch hub's cache with a full
    unpickle; a file planted there is loaded weights-only (its code never runs) and refused in one line."""
    marker = tmp_path / "marker"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    planted.parent.mkdir(parents=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(os.system, f"touch {marker}")}, planted)
    import cleanfid.inception_pytorch as port

    its_own = port.load_state_dict_from_url
    with pytest.raises(InceptionWeightsUnavailable, match="refused .*delete pt_inception-2015-12-05-6726825d.pth"):
        inception_extractor("legacy_pytorch", torch.device("cpu"), batch_size=2)
    assert not marker.exists()
    assert port.load_state_dict_from_url is its_own  # clean-fid's own loader is back


def test_a_file_with_the_pinned_digest_is_loaded_and_recorded(tmp_path, monkeypatch, torchscript_file, jit_loads):
    digest = _sha256(torchscript_file)
    monkeypatch.setitem(features.PINNED_SHA256, INCEPTION_FILE, digest)  # the real file cannot be had here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "ddpm-pipeline" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    shutil.copyfile(torchscript_file, cached)
    for weights, path in (("", str(cached)), (torchscript_file, torchscript_file)):
        ex = inception_extractor("clean", torch.device("cpu"), weights=weights, batch_size=2)
        assert ex.weights_sha256 == digest and jit_loads[-1] == path
        feats = ex(np.zeros((3, 1, 8, 8), np.uint8))
        assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert len(jit_loads) == 2


# --------------------------------------------------------------------------------------- decompression bombs

BOMB_SIDE = 10_000  # 10^8 pixels: 284 KiB of PNG, ~1 GB once prepare decoded and converted it (before the fix)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png(BOMB_SIDE)
    assert len(data) < 300 * 1024
    return data


def _small_png(path, value: int, side: int = 8) -> None:
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)


def test_prepare_skips_a_bomb_from_its_header(tmp_path, bomb):
    for name in ("warm", "photos"):
        (tmp_path / name).mkdir()
        _small_png(tmp_path / name / "a.png", 10)
        _small_png(tmp_path / name / "c.png", 200)
    (tmp_path / "photos" / "b.png").write_bytes(bomb)
    out = tmp_path / "out"
    mb, seconds, log = peak_mb(
        f"from pipeline.data.prepare import prepare\n"
        f"prepare({str(tmp_path / 'warm')!r}, {str(tmp_path / 'o')!r}, resolution=8, workers=1, progress=False)",
        f"prepare({str(tmp_path / 'photos')!r}, {str(out)!r}, resolution=8, workers=1, progress=False)")
    assert mb < 50, log  # before: +955 MB, 3.0 s, and the bomb was accepted (resized to 8x8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["options"]["max_pixels"] == MAX_PIXELS
    [skip] = manifest["unreadable"]
    assert skip["input"].endswith("b.png")
    assert skip["error"] == f"ValueError: 10000x10000 is 100000000 pixels, over --max-pixels {MAX_PIXELS}; not decoded"
    assert f"prepare: skipped {skip['input']}: {skip['error']}\n" in log


def test_max_pixels_is_the_bound_and_each_skip_has_its_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    _small_png(tmp_path / "photos" / "a.png", 10, side=8)  # 64 pixels
    _small_png(tmp_path / "photos" / "b.png", 20, side=9)  # 81
    _small_png(tmp_path / "photos" / "c.png", 30, side=10)  # 100
    code = prepare_main([str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--resolution", "8",
                         "--max-pixels", "64", "--quiet"])
    err = capsys.readouterr().err.splitlines()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert code == 3 and manifest["num_samples"] == 1
    assert sorted(u["input"][-5:] for u in manifest["unreadable"]) == ["b.png", "c.png"]  # in the seeded order
    skipped = sorted(ln for ln in err if ln.startswith("prepare: skipped "))
    assert len(skipped) == 2 and skipped[0].endswith("b.png: ValueError: 9x9 is 81 pixels, over --max-pixels 64; "
                                                     "not decoded")
    assert "SKIPPED 2 unreadable inputs" in err[-1]
    assert prepare_main([str(tmp_path / "photos"), "--out", str(tmp_path / "strict"), "--resolution", "8",
                         "--max-pixels", "64", "--strict", "--quiet"]) == 2


def test_a_bomb_inside_a_shard_is_a_counted_skip_from_its_header(tmp_path, bomb):
    # the data set's author planted it and re-sealed the manifest (sha256s and sample index match), so only the
    # image's own size, against the manifest's 8x8, can refuse it
    folder, _ = make_shards(str(tmp_path), 16, per_shard=8, size=8, channels=3)
    intact = copy_folder(folder, str(tmp_path / "intact"))
    key = plant_sample(folder, "train-000000.tar", 3, {"png": bomb})
    setup = (
        "import warnings\n"
        "from pipeline.config import DataConfig\n"
        "from pipeline.data.loader import StreamingLoader\n"
        "def epoch(folder):\n"
        "    loader = StreamingLoader(DataConfig(shards=folder, num_workers=0, shuffle_buffer=4), batch_size=5)\n"
        "    it = iter(loader)\n"
        "    got = [i for _ in range(3) for i in next(it)['index'].tolist()]\n"
        "    it.close()\n"
        "    return got, loader.stats\n"
        f"epoch({intact!r})"
    )
    measured = (
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    got, stats = epoch({folder!r})\n"
        "print('GOT', sorted(got), stats['skipped_samples'], stats['skipped_shards'])\n"
        "print('WARN', *[str(w.message) for w in caught], sep='\\n')"
    )
    mb, seconds, log = peak_mb(setup, measured)
    assert mb < 50, log  # before: +954 MB, 1.8 s per bomb, then refused for its size
    got = next(ln for ln in log.splitlines() if ln.startswith("GOT "))
    assert got == f"GOT {sorted(set(range(16)) - {3})} 1 0"  # every other sample once; the bomb counted
    assert f"key {key}: cannot decode (ValueError: image is 10000x10000, expected 8x8 (its header" in log
