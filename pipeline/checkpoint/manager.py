"""Writing checkpoints: ``CheckpointManager``, made from its own config section and a registry of stateful parts
(after torchtitan's checkpointer); it owns the cadence, keep-k, sealing (sha256 of every file, fsync, COMPLETE
written last, the folder renamed into place), resume and listing. The folder format and the read-only view:
``pipeline.checkpoint.folder``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline import dist
from pipeline.checkpoint.folder import (
    COMPLETE,
    DONE,
    META,
    Checkpoint,
    CheckpointError,
    NonFiniteWeightsError,
    _first_line,
    complete_checkpoints,
    deepspeed_safe_globals,
    model_config_hash,
    model_identity,
    remove_stale_tmp,
    resolve_resume,
    save_weights_file,
    step_dir_name,
)
from pipeline.config import CheckpointConfig, to_yaml
from pipeline.data.manifest import sha256_file


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _disk_full(out_dir: Path, exc: BaseException) -> str:
    """The file system's mount point when ``exc`` came from a full disk (libraries word it differently:
    OSError ENOSPC, torch's "iostream error", safetensors' StorageFull), else ""."""
    text = f"{type(exc).__name__}: {exc}"
    said = getattr(exc, "errno", None) == errno.ENOSPC or any(
        w in text for w in ("No space left", "StorageFull", "iostream error", "failed writing file"))
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        free = None
    return str(_mount_point(out_dir)) if said or (free is not None and free < (1 << 20)) else ""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class PerRank:
    """Registers a part whose state differs by rank (each rank saves and restores its own)."""

    part: Stateful


def _fsync_tree(folder: Path) -> None:
    """Flush every file's data (and the folders' entries) to disk before COMPLETE is written."""
    for p in sorted(folder.rglob("*")):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())



def _is_weights_state(state: dict[str, Any]) -> bool:
    weights = state.get("weights")
    return isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())



# --------------------------------------------------------------------------------------------- writing


class CheckpointManager:
    """Saves and restores the registered parts plus the accelerator's state, on every rank.

    ``record`` is the resolved config: written as config.yaml, and its model/diffusion sections decide
    which checkpoints fit (resume refuses others). Collectives (save_state, barriers) run on every rank;
    files that exist once are written by rank 0 only.
    """

    def __init__(self, out_dir: str | Path, cfg: CheckpointConfig, *, accelerator: Any,
                 parts: dict[str, Stateful | PerRank], record: Any, weights_finite: Callable[[], bool] | None = None):
        if META not in parts:
            raise ValueError(f"CheckpointManager needs a part named {META!r} (the progress that meta.json records)")
        self.out_dir, self.cfg, self.accelerator, self.parts, self.record = Path(out_dir), cfg, accelerator, parts, record
        self.weights_finite = weights_finite
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
        decision: tuple[str, Any] = ("fresh", None)
        if self.accelerator.is_main_process:
            try:
                path = resolve_resume(self.out_dir, self.cfg.resume)
                decision = ("resume", str(path)) if path is not None else ("fresh", None)
            except CheckpointError as exc:
                decision = ("error", str(exc))
        # rank 0 decides (it verifies the files once), so every rank loads the same folder or stops alike
        kind, value = dist.broadcast_object(decision)
        if kind == "error":
            raise CheckpointError(value)
        if kind == "fresh":
            return None
        ckpt = Checkpoint(value)
        ckpt.check_compatible(self.record, self.accelerator.num_processes)
        rank = self.accelerator.process_index

        def per_rank(name: str, part: Any) -> bool:  # saved per rank: now, or (per_rank_before) by earlier versions
            return isinstance(part, PerRank) or (getattr(part, "per_rank_before", False)
                                                 and not (ckpt.path / f"{name}.json").is_file()
                                                 and (ckpt.path / name / f"rank-{rank}.json").is_file())

        lacking = [name for name, part in self.parts.items() if not per_rank(name, part) and not any(
            (ckpt.path / f"{name}{ext}").is_file() for ext in (".safetensors", ".json"))]
        if lacking:  # e.g. an EMA added to the config (ema.decays, ema.posthoc.sigma_rels) after the run started
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds no {', '.join(lacking)}: the config keeps state this run did not "
                "keep when it was written (an EMA added with ema.decays or ema.posthoc.sigma_rels?); an EMA cannot "
                "start in the middle of a run. Remove it from the config, or start a new run (name=NEW)"
            )
        try:
            # accelerate loads its files weights-only but swallows a refused RNG file with an info log: refuse
            # it loudly here, before anything is restored
            from accelerate.utils import load as accelerate_load

            rng_file = ckpt.path / "accelerate" / f"random_states_{rank}.pkl"
            if rng_file.is_file():
                accelerate_load(rng_file)
            self.accelerator.load_state(str(ckpt.path / "accelerate"))
            for name, part in self.parts.items():
                state = ckpt.part_state(name, rank=rank if per_rank(name, part) else None)
                (part.part if isinstance(part, PerRank) else part).load_state_dict(state)
                if hasattr(part, "attach"):  # a part with files of its own: they are in this folder now
                    part.attach(ckpt.path)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds a file that is not plain weights ({_first_line(exc)}); it is refused "
                "because unpickling it could run code. Resume from a checkpoint you trust"
            ) from None
        except Exception as exc:  # any library's refusal of a damaged file (safetensors, torch, DeepSpeed, json)
            raise CheckpointError(f"checkpoint {ckpt.path} cannot be loaded: {_first_line(exc)}; resume from an "
                                  "older one (checkpoint.resume=PATH) or start fresh (checkpoint.resume=none)") from None
        return ckpt.path

    # save
    def save(self, step: int) -> Path:
        """Write ``out_dir/step-NNNNNNNN`` (every rank); keep the newest ``checkpoint.keep``.

        Refused (CheckpointError, nothing published) when ``weights_finite()`` says the weights or EMA hold a
        NaN/inf, or when the disk fills up while writing (the previous checkpoint stays as it was).
        """
        acc, main = self.accelerator, self.accelerator.is_main_process
        if self.weights_finite is not None and not self.weights_finite():
            raise NonFiniteWeightsError(
                f"the weights or the EMA hold NaN/inf at step {step}: checkpoint not written, training stopped. "
                f"{self.newest_intact_note()}"
            )
        final = self.out_dir / step_dir_name(step)
        tmp = self.out_dir / f".tmp-{step_dir_name(step)}"
        try:
            if main:
                if tmp.exists():  # left by a job killed while saving this same step
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()

            # Collective: every rank writes its part (DeepSpeed shards, RNG state random_states_<r>.pkl), and
            # gathers what rank 0 writes alone of a part spread over the ranks.
            acc.save_state(str(tmp / "accelerate"))
            for part in self.parts.values():
                if hasattr(part, "prepare_state_dict"):
                    part.prepare_state_dict()
            written: dict[str, str] = {}  # files parts wrote or linked themselves -> their sha256, known already
            for name, part in self.parts.items():
                if isinstance(part, PerRank):
                    (tmp / name).mkdir(exist_ok=True)
                    _write_text(tmp / name / f"rank-{acc.process_index}.json", json.dumps(part.part.state_dict()))
                elif main and name != META:
                    self._write_part(tmp, name, part.state_dict(), step)
                    if hasattr(part, "write_files"):  # e.g. the EMA snapshots, hard links to files written once
                        written.update(part.write_files(tmp, step))
            if main:
                _write_text(tmp / "config.yaml", to_yaml(self.record))
            acc.wait_for_everyone()

            # Seal: every file's sha256 into meta.json, everything on disk, then COMPLETE and the atomic rename
            # (a folder named step-N always has COMPLETE, and COMPLETE means the bytes are there).
            if main:
                _fsync_tree(tmp)
                digests = {str(p.relative_to(tmp)): written.get(str(p.relative_to(tmp))) or sha256_file(p)
                           for p in sorted(tmp.rglob("*")) if p.is_file()}
                self._write_part(tmp, META, {**self.parts[META].state_dict(), "sha256": digests}, step)
                _write_text(tmp / COMPLETE, f"{step}\n")
                _fsync_tree(tmp)
        except Exception as exc:
            full = _disk_full(self.out_dir, exc)
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; it was never complete
            if full:
                raise CheckpointError(
                    f"no space left on {full} while writing checkpoint {tmp.name}; {self.newest_intact_note()} "
                    "Free space there (or lower checkpoint.keep) and resume"
                ) from None
            raise
        if main:
            if final.exists():  # the same step saved again (a resumed run that stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        for part in self.parts.values():
            if hasattr(part, "attach"):
                part.attach(final)
        return final

    def newest_intact_note(self) -> str:
        """A sentence naming the newest complete checkpoint and whether its files verify (checked, not assumed)."""
        found = self.complete()
        if not found:
            return f"There is no complete checkpoint in {self.out_dir}."
        try:
            problems = Checkpoint(found[-1]).verify()
        except CheckpointError as exc:  # its meta.json is unreadable or names files outside it
            problems = [str(exc)]
        if problems:
            return f"The newest checkpoint, {found[-1]}, fails verification too ({problems[0]})."
        return f"The previous checkpoint, {found[-1]}, is intact (its files match their sha256)."

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


def make_deepspeed_loads_weights_only(engine: Any) -> None:
    """DeepSpeed's checkpoint engine unpickles every file with ``weights_only=False``, so a tampered checkpoint
    could run code on resume. Route its loads through torch's weights-only unpickler with the few DeepSpeed
    classes its files need allowed; anything else is refused (pickle.UnpicklingError -> CheckpointError)."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
