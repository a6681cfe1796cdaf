"""Configuration: merging order, type checking and validation messages."""

import pytest

from pipeline.config import Config, ConfigError, flatten, from_yaml, load_config, to_yaml


def test_overrides_win_over_yaml_and_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ndata:\n  shards: /data/x\ntrain:\n  lr: 1.0e-3\n  batch_size: 64\n")
    cfg = load_config(path, ["train.lr=5e-4"])
    assert cfg.name == "exp"
    assert cfg.train.lr == 5e-4  # override beats YAML
    assert cfg.train.batch_size == 64  # YAML beats default
    assert cfg.train.warmup_steps == 5000  # default


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lr=abc"], "train.lr"),
        (["train.lernrate=1"], "lernrate"),
        (["data.mode=sometimes"], "data.mode='sometimes' is not allowed; choose one of 'exact', 'resampled'"),
        (["model.base_channels=100"], "multiple of 32"),
        (["model.image_size=30"], "divisible by 2**3"),
        (["train.batch_size=10", "train.micro_batch_per_gpu=4"], "not divisible"),
        (["train.lr"], "key=value"),
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
