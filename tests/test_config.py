"""Configuration: merging order, type checking and validation messages."""

import dataclasses
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
    # one param per leaf: per field of each section, per field of a nested section (ema.posthoc.*)
    leaves = lambda obj: sum(leaves(v) if dataclasses.is_dataclass(v) else 1 for v in vars(obj).values())  # noqa: E731
    assert len(flat) == leaves(cfg) == sum(leaves(getattr(cfg, f)) for f in vars(Config()) if f != "name") + 1


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


# The geometry that the data of each shipped config that leaves it to the data has (the others set it)
DATA_GEOMETRY = {"digits": (8, 1), "images32": (32, 3), "images32-cpu": (32, 3)}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model(path):
    import dataclasses
    import warnings

    import torch

    from pipeline.model.unet import PRESETS, UNet

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config uses no old key and reaches every attention resolution
        cfg = load_config(path, ["data.shards=data/any"])
        assert cfg.train.out_dir == f"runs/{cfg.name}"  # name decides where a run goes
        model = cfg.model
        if not model.resolved:
            size, channels = DATA_GEOMETRY[cfg.name]
            model = dataclasses.replace(model, image_size=size, channels=channels)
    with torch.device("meta"):  # shapes only: the 256x256 net would take seconds to initialise
        net = UNet(model)
    assert sum(p.numel() for p in net.parameters()) > 0
    # the U-Net preset of the same name is the same network as the shipped config
    if cfg.name in PRESETS:
        assert ModelConfig(**PRESETS[cfg.name]) == model


def test_model_config_widths_are_the_cifar10_preset_and_attention_follows_the_size():
    from pipeline.config import default_attention
    from pipeline.model.unet import PRESETS

    assert ModelConfig(image_size=32, channels=3) == ModelConfig(**PRESETS["cifar10"])
    assert ModelConfig().image_size is None and not ModelConfig().resolved  # geometry from the data
    # the rule (docs/model.md): 16x16 where the U-Net reaches it (the paper's 32 and 256 networks), else the lowest
    assert default_attention(32, 4) == [16] and default_attention(256, 6) == [16]
    assert default_attention(8, 2) == [4] and default_attention(64, 3) == [16] and default_attention(64, 2) == [32]
    assert ModelConfig(image_size=8, channels=1, channel_mult=[1, 2]).attn_resolutions == [4]
    assert ModelConfig(image_size=32, channels=3, attn_resolutions=[]).attn_resolutions == []  # explicit: kept


@pytest.mark.parametrize("name", ["a/b", "..", "-x", "my run"])
def test_name_must_be_a_simple_name(name):
    with pytest.raises(ConfigError, match="must be a simple name"):
        load_config(None, ["data.shards=x", f"name={name}"])


def test_name_decides_out_dir_unless_set():
    assert load_config(REPO / "configs" / "digits.yaml", ["name=mine"]).train.out_dir == "runs/mine"
    assert load_config(REPO / "configs" / "digits.yaml", ["name=mine", "train.out_dir=/x/y"]).train.out_dir == "/x/y"


def test_an_override_error_blames_the_overrides_not_the_file():
    with pytest.raises(ConfigError, match=r"in the overrides \(key 'train.total_steps'\)"):
        load_config(REPO / "configs" / "digits.yaml", ["train.total_steps=abc"])


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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_configs_parse_with_our_bucket_sizes(stage):
    import json

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    raw = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    zero = DeepSpeedZeroConfig(**raw["zero_optimization"])  # DeepSpeed's own schema: unknown keys are refused
    assert zero.stage == stage and zero.overlap_comm
    assert zero.reduce_bucket_size == 10_000_000  # not DeepSpeed's 5e8: our U-Nets span several buckets
    if stage < 3:
        assert zero.allgather_bucket_size == 10_000_000
    else:
        assert zero.prefetch_bucket_size == 10_000_000 and zero.param_persistence_threshold == 100_000
    # the CIFAR-10 U-Net (35.7M parameters) reduces in at least 3 buckets
    assert 35_746_307 / zero.reduce_bucket_size > 3
