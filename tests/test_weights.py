"""pipeline.checkpoint.weights.load_unet: the one way a checkpoint's weights become a U-Net (training's init_from,
evaluation, export and the MLflow model all call it). Checkpoints are written in the trainer's format
(tests/helpers/evaluation.py); the outputs are compared with a U-Net built independently from the same tensors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoint.folder import EMA_FILE, Checkpoint, CheckpointError, sha256_file
from pipeline.checkpoint.weights import load_unet
from pipeline.config import ModelConfig, to_dict
from pipeline.model.unet import UNet
from tests.helpers import evaluation as h

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    cfg = h.tiny_config(str(tmp_path / "no-data"), tmp_path / "run")
    return cfg, h.write_checkpoint(cfg, 7, seed=3)


def _out(net: torch.nn.Module, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, cfg.model.channels, cfg.model.image_size, cfg.model.image_size), generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([0, 19]))


def _independent(cfg, state) -> torch.nn.Module:
    net = UNet(cfg.model)
    net.load_state_dict(state)
    return net.eval()


def test_the_primary_ema_of_a_folder_and_of_its_weights_file_give_the_same_network(ckpt):
    cfg, path = ckpt
    expected = h.tiny_weights(cfg, 3)
    for source in (path, Checkpoint(path), path / EMA_FILE):
        loaded = load_unet(source, "ema")
        assert loaded.step == 7 and to_dict(loaded.model) == to_dict(cfg.model)
        assert loaded.diffusion.timesteps == cfg.diffusion.timesteps == 20
        assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
        assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in expected.items())
        assert torch.equal(_out(loaded.net, cfg), _out(_independent(cfg, expected), cfg))
    with pytest.raises(CheckpointError, match="weights file holding one set of weights"):
        load_unet(path / EMA_FILE, "raw")


def test_raw_weights_come_from_the_accelerate_state_under_its_wrapper_prefix(ckpt):
    cfg, path = ckpt
    raw = h.tiny_weights(cfg, 11)
    (path / "accelerate").mkdir()
    save_file({f"net.{k}": v for k, v in raw.items()}, str(path / "accelerate" / "model.safetensors"))
    loaded = load_unet(path, "raw")
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in raw.items())
    ema = load_unet(path).net.state_dict()
    assert not all(torch.equal(loaded.net.state_dict()[k], ema[k]) for k in raw)  # not the EMA read twice


def test_another_network_is_refused_naming_the_keys_and_dropout_is_not_the_network(ckpt):
    cfg, path = ckpt
    wider = ModelConfig(**{**to_dict(cfg.model), "base_channels": 64})
    with pytest.raises(CheckpointError, match="model.base_channels: checkpoint 32, now 64"):
        load_unet(path, expect=wider)
    assert load_unet(path, expect=ModelConfig(**{**to_dict(cfg.model), "dropout": 0.3})).step == 7


def test_a_file_that_differs_from_its_record_is_refused_and_an_unknown_name_lists_the_ones_there(ckpt):
    cfg, path = ckpt
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = {EMA_FILE: sha256_file(path / EMA_FILE)}
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_unet(path).step == 7  # intact: passes
    with pytest.raises(CheckpointError, match="has no EMA 'decay0.5'; it has decay"):
        load_unet(path, "decay0.5")
    blob = bytearray((path / EMA_FILE).read_bytes())
    blob[-1] ^= 0xFF  # the last byte of the last tensor
    (path / EMA_FILE).write_bytes(bytes(blob))
    fresh = Checkpoint(path)  # verification is cached per file identity (size, mtime): the rewrite is seen
    with pytest.raises(CheckpointError, match="ema.safetensors has sha256"):
        load_unet(fresh)


def test_no_other_production_module_builds_a_unet_from_checkpoint_files():
    """Reading an EMA or the raw weights of a checkpoint happens in pipeline/checkpoint/ only: the four consumers go
    through load_unet (a static check of the call sites)."""
    readers = {"read_ema", "raw_weights", "ema_weights", "load_weights_file"}
    offenders, users = [], set()
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("evaluation/*.py"), *REPO.glob("launch/*.py")]:
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in readers and not rel.startswith("pipeline/checkpoint/"):
                    offenders.append(f"{rel}:{node.lineno} {name}")
                if name == "load_unet":
                    users.add(rel)
    # export's import prints the parameter count of the checkpoint it just wrote: a count, not a network
    assert [o.split(" ")[1] for o in offenders if o.startswith("evaluation/export.py:")] in ([], ["read_ema"])
    assert not [o for o in offenders if not o.startswith("evaluation/export.py:")], offenders
    assert {"pipeline/train/loop.py", "evaluation/evaluate.py", "evaluation/export.py",
            "pipeline/tracking/mlflow_model.py", "pipeline/tracking/logged_model.py"} <= users, users
