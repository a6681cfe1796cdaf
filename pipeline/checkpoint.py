"""Training checkpoints: ``out_dir/step-NNNNNNNN/``, complete only with a ``COMPLETE`` marker.

Layout (docs/architecture.md):

    step-00001000/
      COMPLETE              written last; the folder was .tmp-step-00001000 until then
      accelerate/           accelerator.save_state: model, optimizer, grad scaler, RNG of every rank
      ema.safetensors       EMA U-Net weights (fp32) + the model/diffusion config in the metadata
      config.yaml           the resolved config
      meta.json             step, images_seen, epoch, mlflow ids, world_size, model_config_hash, finished
      data/rank-<r>.json    loader position of each rank

Every rank calls ``save``/``load`` (DeepSpeed's save_state is a collective: gating it on rank 0
deadlocks); only the files that exist once are written by rank 0. The learning rate is a function of
the step (``pipeline.trainer.lr_at``), so the step is the LR schedule's whole state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline import dist
from pipeline.config import from_yaml, to_dict, to_yaml

STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
DONE = "TRAINING_DONE"
_MODEL_SECTIONS = ("model", "diffusion")  # what must match for the weights to mean the same thing


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def model_config_hash(cfg: Any) -> str:
    """sha256 of the model and diffusion sections: a checkpoint's weights mean the same thing only if equal."""
    blob = json.dumps({s: to_dict(getattr(cfg, s)) for s in _MODEL_SECTIONS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``out_dir``, oldest first. Temporary and unmarked folders are ignored."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if STEP_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint in out_dir (None if there is none); ``none``; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such folder; pass auto, none or a step-NNNNNNNN folder")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"train.resume={resume}: the folder has no {COMPLETE} marker (it was being written when the job "
            "stopped); pick an older step-NNNNNNNN folder or use train.resume=auto"
        )
    return path


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r}, now {b!r}"]


def check_compatible(path: Path, cfg: Any, world_size: int) -> dict[str, Any]:
    """Refuse a checkpoint of another model/diffusion config (warn on another world size); return meta.json."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("model_config_hash") != model_config_hash(cfg):
        saved = from_yaml((path / "config.yaml").read_text())
        diffs: list[str] = []
        for section in _MODEL_SECTIONS:
            diffs += _diff(to_dict(getattr(saved, section)), to_dict(getattr(cfg, section)), section)
        raise CheckpointError(
            f"checkpoint {path} was trained with a different model config; differing keys:\n  "
            + "\n  ".join(diffs)
            + "\nSet those keys back, or start fresh with train.resume=none (or another train.out_dir)"
        )
    if meta.get("world_size") != world_size:
        # The weights and optimizer are whole on every rank (DDP); the loader re-maps positions and
        # restarts at the next epoch boundary (it warns). Not bitwise, but nothing is lost.
        warnings.warn(
            f"checkpoint {path} was written by {meta.get('world_size')} processes, this job has {world_size}: "
            "resuming, but not bitwise (the data order restarts at the next epoch boundary)",
            stacklevel=2,
        )
    return meta


@dataclass
class Loaded:
    path: Path
    meta: dict[str, Any]
    ema_weights: dict[str, torch.Tensor]
    ema_counters: dict[str, torch.Tensor]
    loader_state: dict[str, Any]


def load(accelerator: Any, path: Path, cfg: Any) -> Loaded:
    """Restore the accelerator's objects from ``path`` (every rank) and return the rest."""
    meta = check_compatible(path, cfg, accelerator.num_processes)
    accelerator.load_state(str(path / "accelerate"))
    weights = load_file(str(path / "ema.safetensors"))
    with safe_open(str(path / "ema.safetensors"), "pt") as f:
        extra = f.metadata() or {}
    counters = {
        "step": torch.tensor(int(extra.get("ema_step", meta["step"]))),
        "initted": torch.tensor(extra.get("ema_initted", "1") == "1"),
    }
    loader_state = json.loads((path / "data" / f"rank-{accelerator.process_index}.json").read_text())
    return Loaded(path, meta, weights, counters, loader_state)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def export_ema(path: Path, weights: dict[str, torch.Tensor], cfg: Any, *, step: int, counters: dict | None = None):
    """EMA weights as safetensors, with the model and diffusion config (JSON) in its metadata."""
    metadata = {
        "format": "ddpm-ema-1",
        "step": str(step),
        "model": json.dumps(to_dict(cfg.model)),
        "diffusion": json.dumps(to_dict(cfg.diffusion)),
    }
    if counters is not None:
        metadata["ema_step"] = str(int(counters["step"]))
        metadata["ema_initted"] = "1" if bool(counters["initted"]) else "0"
    save_file(weights, str(path), metadata=metadata)


def read_ema(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(U-Net state_dict, {"model": {...}, "diffusion": {...}, "step": int}) from an ema.safetensors."""
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
    info = {"step": int(md.get("step", -1)), "model": json.loads(md["model"]), "diffusion": json.loads(md["diffusion"])}
    return load_file(str(path)), info


def save(
    accelerator: Any,
    cfg: Any,
    *,
    step: int,
    meta: dict[str, Any],
    ema_weights: dict[str, torch.Tensor],
    ema_counters: dict[str, torch.Tensor],
    loader_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/step-NNNNNNNN`` on every rank; return its path. Keeps the newest ``keep_checkpoints``."""
    out = Path(cfg.train.out_dir)
    final = out / step_dir_name(step)
    tmp = out / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        if tmp.exists():  # left by a job killed while saving this same step
            shutil.rmtree(tmp)
        (tmp / "data").mkdir(parents=True)
    accelerator.wait_for_everyone()

    # Collective: every rank writes its part (DeepSpeed shards, RNG state random_states_<r>.pkl).
    accelerator.save_state(str(tmp / "accelerate"))
    _write_text(tmp / "data" / f"rank-{accelerator.process_index}.json", json.dumps(loader_state))
    if accelerator.is_main_process:
        export_ema(tmp / "ema.safetensors", ema_weights, cfg, step=step, counters=ema_counters)
        _write_text(tmp / "config.yaml", to_yaml(cfg))
        full_meta = {**meta, "step": step, "world_size": accelerator.num_processes,
                     "model_config_hash": model_config_hash(cfg)}
        _write_text(tmp / "meta.json", json.dumps(full_meta, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()

    # Mark and publish: the rename is atomic, so a folder named step-N always has COMPLETE.
    if accelerator.is_main_process:
        _write_text(tmp / COMPLETE, f"{step}\n")
        if final.exists():  # the same step saved again (a resumed run that stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(out)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_stale_tmp(out_dir: str | Path) -> int:
    """Delete ``.tmp-step-*`` folders left by a killed job (rank 0, at start). Returns how many."""
    out = Path(out_dir)
    stale = list(out.glob(".tmp-step-*")) if out.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def mark_done(out_dir: str | Path, step: int) -> None:
    if dist.is_main():
        _write_text(Path(out_dir) / DONE, f"{step}\n")
