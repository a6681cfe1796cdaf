"""Training checkpoints (reading; writing: ``pipeline.checkpoint.manager``): ``out_dir/step-NNNNNNNN/``, complete only with a ``COMPLETE`` marker.

Training holds one ``CheckpointManager``, made from its own config section and a registry of stateful
parts (after torchtitan's checkpointer); it owns the cadence, keep-k, completeness and listing:

    manager = CheckpointManager(out_dir, cfg.checkpoint, accelerator=acc, record=cfg,
                                parts={"meta": progress, "ema": ema, "data": PerRank(loader)})
    manager.resume()                       # every rank: newest complete checkpoint (checkpoint.resume=auto)
    if manager.due(step, final=done):
        manager.save(step)                 # every rank (accelerator.save_state is a collective)

Adding a piece of state is one entry in ``parts``: any object with ``state_dict()`` and
``load_state_dict()``. A part whose state is spread over the ranks (the EMA under DeepSpeed ZeRO) also has
``prepare_state_dict()``: every rank calls it before rank 0 calls ``state_dict()``, so that it can gather
its state to rank 0 (a collective); only rank 0 then holds the full state. A part with files of its own
(the power EMAs' snapshots) has ``write_files(folder, step) -> {relative path: sha256}`` (rank 0, right after
its ``state_dict()``; the digests are recorded without hashing the files again) and ``attach(folder)`` (every
rank, after a save is published and after a resume: its files are in that folder now). How a part is stored follows from its state: a state with a ``"weights"`` dict of
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
      data.json             the loader position: every stream of every rank (data/rank-<r>.json before)

Readers (evaluation, the watcher, resume) open a folder as a ``Checkpoint``, which refuses one that is
not complete: the only place that check is made. The learning rate is a function of the step
(``pipeline.train.step.lr_at``), so the step is the LR schedule's whole state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.cli import InputError
from pipeline.config import load_config, to_dict
from pipeline.data.manifest import sha256_file, untyped_source
from pipeline.files import (
    JSON_MAX_BYTES,
    LARGE_JSON_MAX_BYTES,
    SAFETENSORS_HEADER_MAX_BYTES,
    UnsafeFileError,
    inside,
    read_json,
    safetensors_metadata,
)

STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
DONE = "TRAINING_DONE"
EMA_FILE = "ema.safetensors"
DATA_LOCATIONS = ("data.shards", "data.manifest")  # config keys config_to_run takes from the command line only
META = "meta"  # the part saved as meta.json, together with the manager's step, world_size and model hash
_MODEL_SECTIONS = ("model", "diffusion")  # what must match for the weights to mean the same thing


PRIMARY = ""  # the name of the primary EMA (ema.safetensors)


def ema_name(kind: str, value: float) -> str:
    """``decay0.9999`` / ``sigma0.05``: how an EMA is named in files, on the command line and in MLflow."""
    return f"{kind}{float(value)!r}"


def part_name(name: str) -> str:
    """The checkpoint part (and file stem) of an EMA: ``ema`` for the primary, ``ema-<name>`` otherwise."""
    return "ema" if name == PRIMARY else f"ema-{name}"


def ema_file(name: str) -> str:
    """The file of a stored EMA inside a checkpoint folder: ``ema.safetensors`` for the primary."""
    return f"{part_name(name)}.safetensors"


class CheckpointError(RuntimeError, InputError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class NonFiniteWeightsError(RuntimeError):
    """The weights or EMA became non-finite: nothing is checkpointed, the run stops (exit 1)."""


def _first_line(exc: BaseException) -> str:
    """The line of a library's error that says what happened (torch's weights-only refusal puts it last)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln]
    return (said or lines or [type(exc).__name__])[0].split(". Please use")[0]  # not torch's how-to-allow advice




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


# ------------------------------------------------------------------------------------ how parts are stored


def save_weights_file(path: Path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """``state["weights"]`` as safetensors; the state's other entries and ``metadata`` JSON-encoded beside them."""
    extra = {k: v for k, v in state.items() if k != "weights"} | metadata
    save_file(state["weights"], str(path), metadata={k: json.dumps(v) for k, v in extra.items()})


def weights_metadata(path: Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a weights file, its header bounded before it is read (CheckpointError for
    a header that is too large, cut short, or holds malformed or too deeply nested JSON)."""
    try:
        return safetensors_metadata(path, max_header_bytes=SAFETENSORS_HEADER_MAX_BYTES, what="weights file")
    except UnsafeFileError as exc:
        raise CheckpointError(f"{exc}; use another checkpoint") from None


def load_weights_file(path: Path) -> dict[str, Any]:
    """Inverse of save_weights_file: {"weights": {...}, **metadata}."""
    metadata = weights_metadata(path)
    try:
        weights = load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); use another checkpoint") from None
    return {"weights": weights, **metadata}


def export_ema(path: Path, weights: dict[str, torch.Tensor], cfg: Any, *, step: int) -> None:
    """EMA weights as a self-describing safetensors file (the model and diffusion config in its metadata)."""
    save_weights_file(path, {"weights": weights}, {"format": "ddpm-ema-1", "step": step, **model_identity(cfg)})


def read_ema(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(U-Net state_dict, {"model": {...}, "diffusion": {...}, "step": int}) from an ema.safetensors."""
    state = load_weights_file(Path(path))
    try:
        return state["weights"], {"step": int(state.get("step", -1)), "model": state["model"],
                                  "diffusion": state["diffusion"]}
    except (KeyError, TypeError, ValueError) as exc:  # weights of another program, or tampered metadata
        raise CheckpointError(f"{path}: its metadata does not describe our U-Net and schedule ({exc!r}); use "
                              "weights this pipeline wrote") from None


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
        try:
            self.meta: dict[str, Any] = read_json(self.path / "meta.json", max_bytes=JSON_MAX_BYTES, what="meta.json")
            self.step = int(self.meta["step"])
            recorded = self.meta.get("sha256", {})
            if not isinstance(recorded, dict):
                raise TypeError(f"its sha256 record is a {type(recorded).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{what} {self.path}: meta.json cannot be read ({exc}); use an older "
                                  "complete step-NNNNNNNN folder") from None
        try:
            self._check_names(recorded)
        except UnsafeFileError as exc:
            raise CheckpointError(f"{what} {self.path} is refused: {exc}; use another checkpoint") from None

    def _check_names(self, recorded: dict[str, Any]) -> None:
        """Every file name meta.json records is a relative path inside the folder, and no symlink in the folder
        leads out of it (UnsafeFileError): a tampered meta.json must not make us read, hash or link (the power
        EMAs' snapshots) a file elsewhere."""
        for rel in recorded:
            inside(self.path, rel, what="a file named in meta.json:")
        for p in self.path.rglob("*"):  # rglob does not descend into symlinked folders; each link is checked
            if p.is_symlink():
                inside(self.path, str(p.relative_to(self.path)), what="a file of the checkpoint:")

    def verify(self, files: list[str] | None = None) -> list[str]:
        """What is wrong with the files against the sha256 that meta.json recorded ([] = intact).

        ``files``: only these (relative paths), e.g. ["ema.safetensors"]; default all. A checkpoint written
        before checksums were recorded has nothing to verify against and passes.
        """
        recorded: dict[str, str] = self.meta.get("sha256", {})
        problems = []
        for rel in (files if files is not None else sorted(recorded)):
            if rel not in recorded:
                continue
            try:
                digest = sha256_file(self.path / rel)
            except OSError as exc:
                problems.append(f"{rel} cannot be read ({exc.strerror or exc})")
                continue
            if digest != recorded[rel]:
                problems.append(f"{rel} has sha256 {digest[:12]}..., meta.json recorded {recorded[rel][:12]}... "
                                "(changed or damaged since it was written)")
        if files is None:
            on_disk = {str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()}
            problems += [f"{rel} is missing" for rel in sorted(set(recorded) - on_disk)]
            if not problems:
                problems = self.unsafe_pickles()
        return problems

    def unsafe_pickles(self) -> list[str]:
        """The torch-pickled files of the training state (accelerate's and DeepSpeed's) that the weights-only
        unpickler refuses. Checked by one process before any rank loads: a file that only some ranks read
        (a ZeRO partition) would otherwise stop those ranks while the others wait in a collective."""
        # accelerate: ~2 s cold; only training needs it (evaluation and export read checkpoints without it)
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        allowed = list(TORCH_SAFE_GLOBALS)
        if (self.path / "accelerate" / "pytorch_model").is_dir():
            allowed += deepspeed_safe_globals()
        problems = []
        for path in sorted((self.path / "accelerate").rglob("*")):
            if not path.is_file() or path.suffix not in (".pt", ".pkl", ".bin", ".pth"):
                continue
            try:
                with torch.serialization.safe_globals(allowed):
                    # mmap: only the pickle is read; the tensor storages stay on disk
                    torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except pickle.UnpicklingError as exc:
                problems.append(f"{path.relative_to(self.path)} is not plain weights ({_first_line(exc)}); it is "
                                "refused because unpickling it could run code")
            except Exception as exc:
                problems.append(f"{path.relative_to(self.path)} cannot be read ({_first_line(exc)})")
        return problems

    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        """The resolved config the checkpoint was trained with, ``key=value`` overrides on top."""
        return load_config(self.path / "config.yaml", list(overrides))

    def config_to_run(self, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        """``config(overrides)`` for a command that reads the data with it (evaluation): the data locations that
        would run a command or fetch from the network (``pipe:``, URLs) come from the command line, never from
        config.yaml: evaluating a checkpoint from elsewhere must not run what it carries (CheckpointError)."""
        cfg = self.config(overrides)
        given = {o.split("=", 1)[0].strip() for o in overrides}
        for key in DATA_LOCATIONS:
            how = untyped_source(getattr(cfg.data, key.split(".")[1]))
            if how and key not in given:
                raise CheckpointError(
                    f"{self.path}/config.yaml sets {key} to {how}: a checkpoint's config never runs a command or "
                    f"fetches data you did not name. Give the data on the command line ({key}=DIR, or the same "
                    "value if you trust it)"
                )
        return cfg

    def ema_names(self) -> list[str]:
        """The EMAs stored here: "" (the primary, ema.safetensors) first, then each ema-<name>.safetensors by name
        (``ema.decays``: ``decay<d>``; ``ema.posthoc.sigma_rels``: ``sigma<s>``; pipeline/train/ema.py)."""
        more = sorted(p.name[len("ema-"):-len(".safetensors")] for p in self.path.glob("ema-*.safetensors"))
        return [""] + more

    def ema_weights(self, name: str = "") -> dict[str, torch.Tensor]:
        """A stored EMA's U-Net state_dict ("" = the primary). Synthesized post-hoc EMAs and names such as
        ``decay0.9999`` for the primary: ``pipeline.checkpoint.posthoc.ema_weights``."""
        if name and name not in self.ema_names():
            raise CheckpointError(f"{self.path} stores no EMA {name!r}; it stores "
                                  f"{', '.join(n or 'the primary (ema.safetensors)' for n in self.ema_names())}")
        return read_ema(self.path / (f"ema-{name}.safetensors" if name else EMA_FILE))[0]

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
            return read_json(self.path / name / f"rank-{rank}.json", max_bytes=LARGE_JSON_MAX_BYTES, what="state")
        if (self.path / f"{name}.safetensors").is_file():
            return load_weights_file(self.path / f"{name}.safetensors")
        return read_json(self.path / f"{name}.json", max_bytes=LARGE_JSON_MAX_BYTES, what="state")

    def check_compatible(self, cfg: Any, world_size: int) -> None:
        """Refuse a checkpoint of another model/diffusion config, another global batch size, or ZeRO states of
        another world size; say so on another world size (DDP resumes it at the same global data position)."""
        if self.meta.get("model_config_hash") != model_config_hash(cfg):
            saved = model_identity(self.config())
            now = model_identity(cfg)
            diffs = [d for s in _MODEL_SECTIONS for d in _diff(saved[s], now[s], s)]
            raise CheckpointError(
                f"checkpoint {self.path} was trained with a different model config; differing keys:\n  "
                + "\n  ".join(diffs)
                + "\nSet those keys back, or start fresh with checkpoint.resume=none (or another train.out_dir)"
            )
        saved_batch = self.config().train.batch_size
        if saved_batch != cfg.train.batch_size:
            raise CheckpointError(
                f"checkpoint {self.path} was trained with train.batch_size={saved_batch}, this job asks for "
                f"{cfg.train.batch_size}: an optimizer step of another size is another step (the schedule and the "
                f"data position count steps of {saved_batch}); resume with train.batch_size={saved_batch}, or "
                "start a new run from its weights (train.init_from)"
            )
        saved_world = self.meta.get("world_size")
        if saved_world != world_size:
            if any((self.path / "accelerate").rglob("zero_pp_rank_*")):
                raise CheckpointError(
                    f"checkpoint {self.path} holds DeepSpeed ZeRO states partitioned over {saved_world} processes; "
                    f"this job has {world_size}. Resume it on {saved_world} processes, or start a new run from its "
                    "weights (train.init_from)"
                )
            # DDP: weights and optimizer are whole on every rank; the loader continues the interrupted epoch with
            # exactly the samples not yet delivered (data.json, one record of all ranks)
            if os.environ.get("RANK", "0") == "0":  # once, not once per process
                print(f"checkpoint {self.path} was written by {saved_world} processes, this job has {world_size}: "
                      "resuming at the same global data position (same samples per step; dropout masks and the "
                      "gradient all-reduce order differ, so not bitwise)", file=sys.stderr)


def check_compatible(path: Path, cfg: Any, world_size: int) -> dict[str, Any]:
    """Checkpoint(path).check_compatible; returns its meta.json."""
    ckpt = Checkpoint(path)
    ckpt.check_compatible(cfg, world_size)
    return ckpt.meta


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``none``; a path (it must be complete and intact, else CheckpointError);
    ``auto``: the newest complete checkpoint in out_dir that passes verification, falling back to older ones
    with a warning (None if there is none; CheckpointError if there are some and none is intact)."""
    if resume == "none":
        return None
    if resume != "auto":
        try:
            ckpt = Checkpoint(resume, what="checkpoint.resume")
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}, or checkpoint.resume=auto / none") from None
        problems = ckpt.verify()
        if problems:
            raise CheckpointError(f"checkpoint.resume={resume}: {problems[0]}; resume from another checkpoint or "
                                  "use checkpoint.resume=auto (the newest intact one)")
        return ckpt.path
    found = complete_checkpoints(out_dir)
    for path in reversed(found):
        try:
            problems = Checkpoint(path).verify()
        except CheckpointError as exc:
            problems = [str(exc)]
        if not problems:
            return path
        # printed, not a warning: a resume that skips a checkpoint must be seen whatever the warning filters
        print(f"checkpoint {path} fails verification: {problems[0]}; trying the next older one", file=sys.stderr,
              flush=True)
    if found:
        raise CheckpointError(
            f"no complete checkpoint in {out_dir} passes verification ({len(found)} tried; see above); move the "
            "damaged step-NNNNNNNN folders away, or start fresh with checkpoint.resume=none and another train.out_dir"
        )
    return None


def remove_stale_tmp(out_dir: str | Path) -> int:
    """Delete ``.tmp-step-*`` folders left by a killed job (rank 0, at start). Returns how many."""
    out = Path(out_dir)
    stale = list(out.glob(".tmp-step-*")) if out.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


# ------------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoint files hold besides tensors and containers (ZeRO-1/2/3, fp32/bf16)."""
    # deepspeed: optional at run time (only under --use_deepspeed), ~3 s of import
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
