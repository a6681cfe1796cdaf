"""Assets for the evaluation tests: prepared digits shards, tiny checkpoints in the trainer's format, a run.

Checkpoints are written with the real pieces the trainer uses (pipeline.checkpoint.folder.export_ema, the
resolved config as YAML, meta.json, the COMPLETE marker and the .tmp- rename) around a tiny U-Net, so the
evaluation stage is tested before (and independently of) a trained model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.checkpoint.folder import COMPLETE, DONE, export_ema, model_config_hash, step_dir_name
from pipeline.config import Config, load_config, to_yaml
from pipeline.data.prepare import prepare


def prepare_digits(root: str | Path) -> str:
    """The real digits data (1617 train / 180 test), as the demo prepares it."""
    out = str(Path(root) / "digits")
    if not Path(out, "manifest.json").is_file():
        prepare("digits", out, test_fraction=0.1, seed=0, samples_per_shard=500, workers=1, progress=False)
    return out


def tiny_config(shards: str, out_dir: str | Path, overrides: list[str] = ()) -> Config:
    """A U-Net of a few thousand parameters over 8x8 grey images, T=20; evaluation on the digits net."""
    base = [
        f"data.shards={shards}", f"train.out_dir={out_dir}", "name=tiny",
        "model.image_size=8", "model.channels=1", "model.base_channels=32", "model.channel_mult=[1]",
        "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.dropout=0.0",
        "diffusion.timesteps=20", "diffusion.beta_end=0.5",  # ᾱ_T ≈ 0.003 with only 20 steps
        "eval.feature_extractor=digits", "eval.num_samples=24", "eval.steps=5", "eval.batch_size=16",
        "eval.bpd_max_images=8", "eval.bpd_timesteps=4", "eval.kid_subsets=10", "eval.grid_images=16",
        "eval.device=cpu",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


def tiny_weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """A U-Net state dict with every parameter perturbed (seeded), so the output layer is not ~0."""
    from pipeline.model.unet import UNet

    torch.manual_seed(seed)
    net = UNet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def write_checkpoint(cfg: Config, step: int, *, seed: int = 0, complete: bool = True, run_id: str | None = None,
                     tracking_uri: str | None = None, finished: bool = False) -> Path:
    """out_dir/step-NNNNNNNN as the trainer writes it (EMA export, config, meta, COMPLETE, rename).

    ``complete=False`` leaves the ``.tmp-step-NNNNNNNN`` folder a killed save leaves behind.
    """
    out = Path(cfg.train.out_dir)
    tmp = out / f".tmp-{step_dir_name(step)}"
    tmp.mkdir(parents=True)
    export_ema(tmp / "ema.safetensors", tiny_weights(cfg, seed), cfg, step=step)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    meta = {"step": step, "images_seen": step * cfg.train.batch_size, "epoch": 0, "mlflow_run_id": run_id,
            "mlflow_tracking_uri": tracking_uri, "world_size": 1, "model_config_hash": model_config_hash(cfg),
            "finished": finished}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta))
    if not complete:
        return tmp
    (tmp / COMPLETE).write_text(f"{step}\n")
    final = out / step_dir_name(step)
    os.replace(tmp, final)
    return final


def mark_done(cfg: Config, step: int) -> None:
    (Path(cfg.train.out_dir) / DONE).write_text(f"{step}\n")


def training_run(tracking_uri: str, experiment: str = "eval-test", name: str = "tiny") -> str:
    """A finished MLflow run, as the trainer leaves it; returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    from pipeline.tracking.sink import sqlite_artifact_location

    # artifacts beside the .db, as the sink does (MLflow's default would be ./mlruns in the cwd)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, sqlite_artifact_location(tracking_uri))
    run = client.create_run(exp_id, run_name=name)
    client.log_metric(run.info.run_id, "train/loss", 0.5, step=1)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
