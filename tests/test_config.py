"""Configuration: merging order, type checking and validation messages."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, ModelConfig, flatten, from_yaml, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]


def test_overrides_win_over_yaml_and_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ndata:\n  shards: /data/x\noptimizer:\n  lr: 1.0e-3\ntrain:\n  batch_size: 64\n")
    cfg = load_config(path, ["optimizer.lr=5e-4"])
    assert cfg.name == "exp"
    assert cfg.optimizer.lr == 5e-4  # override beats YAML
    assert cfg.train.batch_size == 64  # YAML beats default
    assert cfg.optimizer.warmup_steps == 5000  # default


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimizer.lr=abc"], "optimizer.lr"),
        (["train.lernrate=1"], "lernrate"),
        (["data.mode=sometimes"], "data.mode='sometimes' is not allowed; choose one of 'exact', 'resampled'"),
        (["model.base_channels=100"], "multiple of 32"),
        (["model.image_size=30"], "divisible by 2**3"),
        (["train.batch_size=10", "train.micro_batch_per_gpu=4"], "not divisible"),
        (["optimizer.lr"], "key=value"),
    ],
)
def test_invalid_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.shards=/x", *overrides])
    assert needle in str(info.value)


def test_missing_required_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip_and_flat_params():
    cfg = load_config(None, ["data.shards=/x", "model.channel_mult=[1,2]", "model.image_size=8"])
    assert from_yaml(to_yaml(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["model.channel_mult"] == "[1, 2]"
    assert flat["data.shards"] == "/x"
    assert len(flat) == sum(len(vars(getattr(cfg, f))) for f in vars(Config()) if f != "name") + 1


def test_bare_no_for_mixed_precision_means_no(tmp_path):
    # YAML 1.1 reads a bare `no` as false, in a file and in key=value alike
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  shards: /x\ntrain:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["data.shards=/x", "train.mixed_precision=no"]).train.mixed_precision == "no"


def test_moved_train_keys_still_load_with_a_warning_naming_the_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  shards: /x\ntrain:\n  lr: 3.0e-3\n  ema_decay: 0.99\n  keep_checkpoints: 5\n")
    with pytest.warns(FutureWarning, match=r"train.lr .* is now optimizer.lr"):
        cfg = load_config(path, ["train.log_every_steps=7", "train.preempt_check_every_steps=3"])
    assert (cfg.optimizer.lr, cfg.ema.decay, cfg.checkpoint.keep) == (3e-3, 0.99, 5)
    assert (cfg.logging.every_steps, cfg.preemption.check_every_steps) == (7, 3)
    # a config saved by an older version (a checkpoint's config.yaml) reads the same way
    with pytest.warns(FutureWarning):
        assert from_yaml(path.read_text()).optimizer.lr == 3e-3
    with pytest.raises(ConfigError, match="sets both train.lr and optimizer.lr"):
        load_config(None, ["data.shards=/x", "train.lr=1e-3", "optimizer.lr=2e-3"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["optimizer.lr", "optimizer.grad_clip", "optimizer.adam_eps", "ema.power"])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.* must be a finite number"):
        load_config(None, ["data.shards=/x", f"{key}={value}"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model(path):
    import warnings

    import torch

    from pipeline.unet import PRESETS, UNet

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config uses no old key and reaches every attention resolution
        cfg = load_config(path)
    with torch.device("meta"):  # shapes only: the 256x256 net would take seconds to initialise
        net = UNet(cfg.model)
    assert sum(p.numel() for p in net.parameters()) > 0
    # the U-Net preset of the same name is the same network as the shipped config
    assert ModelConfig(**PRESETS[cfg.name]) == cfg.model


def test_model_config_defaults_are_the_cifar10_preset():
    from pipeline.unet import PRESETS

    assert ModelConfig() == ModelConfig(**PRESETS["cifar10"])


@pytest.mark.parametrize(("override", "needle"), [
    ("optimizer.adam_beta1=1.0", "optimizer.adam_beta1=1.0 must lie in [0, 1)"),
    ("optimizer.adam_beta2=nan", "optimizer.adam_beta2=nan must lie in [0, 1)"),
    ("optimizer.adam_eps=-1", "optimizer.adam_eps=-1.0 must be > 0"),
    ("optimizer.lr=nan", "optimizer.lr=nan must be a finite number > 0"),
])
def test_optimizer_settings_that_would_poison_the_weights_are_refused(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.shards=/x", override])
    assert needle in str(info.value)
