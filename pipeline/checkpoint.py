"""Training checkpoints: ``out_dir/step-NNNNNNNN/``, complete only with a ``COMPLETE`` marker.

Training holds one ``CheckpointManager``, made from its own config section and a registry of stateful
parts (after torchtitan's checkpointer); it owns the cadence, keep-k, completeness and listing:

    manager = CheckpointManager(out_dir, cfg.checkpoint, accelerator=acc, record=cfg,
                                parts={"meta": progress, "ema": ema, "data": PerRank(loader)})
    manager.resume()                       # every rank: newest complete checkpoint (checkpoint.resume=auto)
    if manager.due(step, final=done):
        manager.save(step)                 # every rank (accelerator.save_state is a collective)

Adding a piece of state is one entry in ``parts``: any object with ``state_dict()`` and
``load_state_dict()``. How a part is stored follows from its state: a state with a ``"weights"`` dict of
tensors becomes ``<name>.safetensors`` (the other entries go into its metadata, JSON-encoded); any other
state becomes ``<name>.json``. A part wrapped in ``PerRank`` (its state differs by rank: the loader's
position) is written by every rank as ``<name>/rank-<r>.json``; the others by rank 0 (they are the same
on every rank). Layout (docs/architecture.md):

    step-00001000/
      COMPLETE              written last; the folder was .tmp-step-00001000 until then
      accelerate/           accelerator.save_state: model, optimizer, grad scaler, RNG of every rank
      ema.safetensors       EMA U-Net weights (fp32) + the model/diffusion config in the metadata
      config.yaml           the resolved config
      meta.json             step, images_seen, mlflow ids, finished + world_size, model_config_hash
      data/rank-<r>.json    loader position of each rank

Readers (evaluation, the watcher, resume) open a folder as a ``Checkpoint``, which refuses one that is
not complete: the only place that check is made. The learning rate is a function of the step
(``pipeline.trainer.lr_at``), so the step is the LR schedule's whole state.
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
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline import dist
from pipeline.config import CheckpointConfig, load_config, to_dict, to_yaml

STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
DONE = "TRAINING_DONE"
EMA_FILE = "ema.safetensors"
META = "meta"  # the part saved as meta.json, together with the manager's step, world_size and model hash
_MODEL_SECTIONS = ("model", "diffusion")  # what must match for the weights to mean the same thing


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class PerRank:
    """Registers a part whose state differs by rank (each rank saves and restores its own)."""

    part: Stateful


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def model_identity(cfg: Any) -> dict[str, dict]:
    """The config sections that decide what the weights mean (model and diffusion), as plain dicts."""
    return {s: to_dict(getattr(cfg, s)) for s in _MODEL_SECTIONS}


def model_config_hash(cfg: Any) -> str:
    """sha256 of the model and diffusion sections: a checkpoint's weights mean the same thing only if equal."""
    return hashlib.sha256(json.dumps(model_identity(cfg), sort_keys=True).encode()).hexdigest()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``out_dir``, oldest first. Temporary and unmarked folders are ignored."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if STEP_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ how parts are stored


def _is_weights_state(state: dict[str, Any]) -> bool:
    weights = state.get("weights")
    return isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())


def save_weights_file(path: Path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """``state["weights"]`` as safetensors; the state's other entries and ``metadata`` JSON-encoded beside them."""
    extra = {k: v for k, v in state.items() if k != "weights"} | metadata
    save_file(state["weights"], str(path), metadata={k: json.dumps(v) for k, v in extra.items()})


def load_weights_file(path: Path) -> dict[str, Any]:
    """Inverse of save_weights_file: {"weights": {...}, **metadata}."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return {"weights": load_file(str(path)), **{k: json.loads(v) for k, v in metadata.items()}}


def export_ema(path: Path, weights: dict[str, torch.Tensor], cfg: Any, *, step: int) -> None:
    """EMA weights as a self-describing safetensors file (the model and diffusion config in its metadata)."""
    save_weights_file(path, {"weights": weights}, {"format": "ddpm-ema-1", "step": step, **model_identity(cfg)})


def read_ema(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(U-Net state_dict, {"model": {...}, "diffusion": {...}, "step": int}) from an ema.safetensors."""
    state = load_weights_file(Path(path))
    return state["weights"], {"step": int(state.get("step", -1)), "model": state["model"],
                              "diffusion": state["diffusion"]}


# --------------------------------------------------------------------------------------------- reading


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r}, now {b!r}"]


class Checkpoint:
    """A complete checkpoint folder, read-only: its meta, config, weights and part states."""

    def __init__(self, path: str | Path, *, what: str = "checkpoint"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{what} {self.path}: no such folder; give an out_dir/step-NNNNNNNN folder")
        if not (self.path / COMPLETE).is_file():
            raise CheckpointError(
                f"{what} {self.path} has no {COMPLETE} marker: it was being written when the job stopped (or is "
                "still being written); use an older complete step-NNNNNNNN folder"
            )
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self.step = int(self.meta["step"])

    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        """The resolved config the checkpoint was trained with, ``key=value`` overrides on top."""
        return load_config(self.path / "config.yaml", list(overrides))

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return read_ema(self.path / EMA_FILE)[0]

    def raw_weights(self, expected: set[str]) -> dict[str, torch.Tensor]:
        """The training weights of the accelerate state (single-model save_state; DDP or plain), U-Net keys."""
        acc = self.path / "accelerate"
        if (acc / "model.safetensors").is_file():
            state = load_file(str(acc / "model.safetensors"))
        elif (acc / "pytorch_model.bin").is_file():
            state = torch.load(acc / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(
                f"the raw weights need {acc}/model.safetensors (or pytorch_model.bin); not found (a DeepSpeed "
                "checkpoint keeps them sharded: convert with DeepSpeed's zero_to_fp32.py first), or use the EMA "
                "weights (eval.use_ema=true)"
            )
        # accelerate saves the wrapped module: strip DDPMLoss's net., DDP's module., torch.compile's _orig_mod.
        for prefix in ("", "net.", "module.", "module.net.", "_orig_mod.", "net._orig_mod."):
            cand = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(cand) == expected:
                return cand
        raise CheckpointError(f"{acc}: raw weights do not match the U-Net: e.g. {sorted(state)[:3]} vs "
                              f"{sorted(expected)[:3]}")

    def part_state(self, name: str, *, rank: int | None) -> dict[str, Any]:
        """The saved state of part ``name`` (``rank`` for a PerRank part)."""
        if rank is not None:
            return json.loads((self.path / name / f"rank-{rank}.json").read_text())
        if (self.path / f"{name}.safetensors").is_file():
            return load_weights_file(self.path / f"{name}.safetensors")
        return json.loads((self.path / f"{name}.json").read_text())

    def check_compatible(self, cfg: Any, world_size: int) -> None:
        """Refuse a checkpoint of another model/diffusion config; warn on another world size."""
        if self.meta.get("model_config_hash") != model_config_hash(cfg):
            saved = model_identity(self.config())
            now = model_identity(cfg)
            diffs = [d for s in _MODEL_SECTIONS for d in _diff(saved[s], now[s], s)]
            raise CheckpointError(
                f"checkpoint {self.path} was trained with a different model config; differing keys:\n  "
                + "\n  ".join(diffs)
                + "\nSet those keys back, or start fresh with checkpoint.resume=none (or another train.out_dir)"
            )
        if self.meta.get("world_size") != world_size:
            # The weights and optimizer are whole on every rank (DDP); the loader re-maps positions and
            # restarts at the next epoch boundary (it warns). Not bitwise, but nothing is lost.
            warnings.warn(
                f"checkpoint {self.path} was written by {self.meta.get('world_size')} processes, this job has "
                f"{world_size}: resuming, but not bitwise (the data order restarts at the next epoch boundary)",
                stacklevel=2,
            )


def check_compatible(path: Path, cfg: Any, world_size: int) -> dict[str, Any]:
    """Checkpoint(path).check_compatible; returns its meta.json."""
    ckpt = Checkpoint(path)
    ckpt.check_compatible(cfg, world_size)
    return ckpt.meta


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint in out_dir (None if there is none); ``none``; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    try:
        return Checkpoint(resume, what="checkpoint.resume").path
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}, or checkpoint.resume=auto / none") from None


def remove_stale_tmp(out_dir: str | Path) -> int:
    """Delete ``.tmp-step-*`` folders left by a killed job (rank 0, at start). Returns how many."""
    out = Path(out_dir)
    stale = list(out.glob(".tmp-step-*")) if out.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


# --------------------------------------------------------------------------------------------- writing


class CheckpointManager:
    """Saves and restores the registered parts plus the accelerator's state, on every rank.

    ``record`` is the resolved config: written as config.yaml, and its model/diffusion sections decide
    which checkpoints fit (resume refuses others). Collectives (save_state, barriers) run on every rank;
    files that exist once are written by rank 0 only.
    """

    def __init__(self, out_dir: str | Path, cfg: CheckpointConfig, *, accelerator: Any,
                 parts: dict[str, Stateful | PerRank], record: Any):
        self.out_dir, self.cfg, self.accelerator, self.parts, self.record = Path(out_dir), cfg, accelerator, parts, record
        self._metadata = model_identity(record)

    # listing and cadence
    def complete(self) -> list[Path]:
        return complete_checkpoints(self.out_dir)

    def due(self, step: int, *, final: bool) -> bool:
        return final or step % self.cfg.every_steps == 0

    def start(self) -> None:
        """Create out_dir and delete half-written folders of a killed job (rank 0; every rank waits)."""
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(self.out_dir)
        self.accelerator.wait_for_everyone()

    # resume
    def resume(self) -> Path | None:
        """Restore every part from checkpoint.resume (every rank); the folder, or None for a fresh start."""
        path = resolve_resume(self.out_dir, self.cfg.resume) if self.accelerator.is_main_process else None
        path = dist.broadcast_object(path)  # rank 0 decides, so every rank loads the same folder
        if path is None:
            return None
        ckpt = Checkpoint(path)
        ckpt.check_compatible(self.record, self.accelerator.num_processes)
        self.accelerator.load_state(str(ckpt.path / "accelerate"))
        rank = self.accelerator.process_index
        for name, part in self.parts.items():
            per_rank = isinstance(part, PerRank)
            (part.part if per_rank else part).load_state_dict(ckpt.part_state(name, rank=rank if per_rank else None))
        return ckpt.path

    # save
    def save(self, step: int) -> Path:
        """Write ``out_dir/step-NNNNNNNN`` (every rank); keep the newest ``checkpoint.keep``."""
        acc, main = self.accelerator, self.accelerator.is_main_process
        final = self.out_dir / step_dir_name(step)
        tmp = self.out_dir / f".tmp-{step_dir_name(step)}"
        if main:
            if tmp.exists():  # left by a job killed while saving this same step
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()

        # Collective: every rank writes its part (DeepSpeed shards, RNG state random_states_<r>.pkl).
        acc.save_state(str(tmp / "accelerate"))
        for name, part in self.parts.items():
            if isinstance(part, PerRank):
                (tmp / name).mkdir(exist_ok=True)
                _write_text(tmp / name / f"rank-{acc.process_index}.json", json.dumps(part.part.state_dict()))
            elif main:
                self._write_part(tmp, name, part.state_dict(), step)
        if main:
            _write_text(tmp / "config.yaml", to_yaml(self.record))
        acc.wait_for_everyone()

        # Mark and publish: the rename is atomic, so a folder named step-N always has COMPLETE.
        if main:
            _write_text(tmp / COMPLETE, f"{step}\n")
            if final.exists():  # the same step saved again (a resumed run that stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _write_part(self, folder: Path, name: str, state: dict[str, Any], step: int) -> None:
        if _is_weights_state(state):
            save_weights_file(folder / f"{name}.safetensors", state,
                              {"format": f"ddpm-{name}-1", "step": step, **self._metadata})
            return
        if name == META:  # what decides whether another job may resume from it, beside the progress
            state = {**state, "step": step, "world_size": self.accelerator.num_processes,
                     "model_config_hash": model_config_hash(self.record)}
        _write_text(folder / f"{name}.json", json.dumps(state, indent=1, sort_keys=True))

    def mark_done(self, step: int) -> None:
        """``TRAINING_DONE``: the run reached its step count (the watcher stops on it)."""
        if self.accelerator.is_main_process:
            _write_text(self.out_dir / DONE, f"{step}\n")
