"""What the data decides: the U-Net's image size and channels come from the prepared data's manifest.json.

``resolve_geometry(cfg)`` runs before anything is created (no process group, no out_dir, no MLflow run):
unset ``model.image_size`` / ``model.channels`` are filled in from the manifest, a config that sets them to
something else is refused in one line naming both values and the key, and ``model.attn_resolutions``
then follows the image size by the rule in ``pipeline.config.default_attention`` unless it is set.
The resolved config is what the checkpoint records, so evaluation and resume see concrete values.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import Config, ConfigError
from pipeline.data.shards import resolve_shards

_KIND = {1: "grey", 3: "RGB"}


def describe(image_size: int, channels: int) -> str:
    """``32x32 RGB`` (for messages)."""
    return f"{image_size}x{image_size} {_KIND.get(channels, f'{channels}-channel')}"


def resolve_geometry(cfg: Config) -> Config:
    """``cfg`` with the model geometry taken from (and checked against) the data; raises ConfigError or DataError."""

    shardset = resolve_shards(cfg.data.shards, cfg.data.split, need_counts=False)
    data_size, data_channels = shardset.image_size, shardset.channels  # 0 = no manifest says
    m = cfg.model
    if not (data_size and data_channels):
        unset = [k for k, v in (("model.image_size", m.image_size), ("model.channels", m.channels)) if v is None]
        if unset:
            raise ConfigError(
                f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set and data.shards="
                f"{cfg.data.shards!r} has no manifest.json that gives the image geometry; set "
                f"{', '.join(f'{k}=N' for k in unset)} (or prepare the data with python -m pipeline.data.prepare)"
            )
        return cfg  # shards without a manifest: the config is the only word (the U-Net checks the first batch)
    differ = [(k, given, data) for k, given, data in (("model.image_size", m.image_size, data_size),
                                                      ("model.channels", m.channels, data_channels))
              if given is not None and given != data]
    if differ:
        sets = ", ".join(f"{k}={given}" for k, given, _ in differ)
        fix = " and ".join(f"{k}={data}" for k, _, data in differ)
        raise ConfigError(
            f"the config sets {sets} but the data at {cfg.data.shards} is {describe(data_size, data_channels)} "
            f"(its manifest.json); remove {' and '.join(k for k, _, _ in differ)} from the config (the data "
            f"decides) or set {fix}"
        )
    model = dataclasses.replace(m, image_size=data_size, channels=data_channels)
    return dataclasses.replace(cfg, model=model)
