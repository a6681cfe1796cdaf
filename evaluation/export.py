"""Export a checkpoint as a diffusers ``DDPMPipeline`` folder, or import one as a checkpoint of ours.

    python -m evaluation.export runs/digits --diffusers exports/digits              # its newest checkpoint, EMA
    python -m evaluation.export runs/digits/step-00004000 --diffusers OUT --weights raw
    python -m evaluation.export runs/digits-ema --diffusers OUT --weights sigma0.08   # a post-hoc EMA
    python -m evaluation.export --from-diffusers ddpm-cifar10-32 --out runs/ddpm-cifar10 data.shards=data/cifar10

Export writes ``OUT/model_index.json``, ``OUT/unet/`` (a ``UNet2DModel``: config.json and safetensors) and
``OUT/scheduler/`` (a ``DDPMScheduler`` with our β_t, T, variance and prediction), as
``DDPMPipeline.save_pretrained`` does, plus ``OUT/ddpm_export.json`` (which checkpoint, step and weights).
``DDPMPipeline.from_pretrained(OUT)`` loads it.

Import reads a ``DDPMPipeline`` folder (``unet/`` and ``scheduler/``), or a ``UNet2DModel`` folder with its
scheduler config beside it or in ``../scheduler/``, and writes ``OUT/step-00000000`` (or the
``step-NNNNNNNN`` folder ``--out`` names): a complete checkpoint (EMA weights, config.yaml, meta.json, sha256
records, COMPLETE) without training state. ``python -m evaluation.evaluate --checkpoint OUT`` samples and
scores it; ``train.init_from=OUT`` starts a training from its weights (it cannot be resumed: there is no
optimizer, data or RNG state). ``key=value`` arguments go into its config.yaml (``data.shards=`` for the data
to evaluate against, ``model.dropout=`` for a fine-tune, ...); its model and diffusion sections come from the
diffusers configs.

Both directions map every tensor (pipeline/model/interop.py), refuse a layout or schedule the other side cannot
represent, and check that the two networks give the same output on the same inputs before writing anything.
Weights are read as safetensors (a ``.bin`` only with torch's weights-only loader). ``--weights`` is ``ema``
(the primary EMA), ``raw`` (the training weights) or the name of any other EMA of the checkpoint, as
``evaluation.evaluate --ema`` takes it: ``decay<d>`` (``ema.decays``), ``sigma<s>`` (a stored power-function
EMA, or one synthesized from the checkpoint's post-hoc snapshots for any other ``s``).

Exit codes as every command's (pipeline/cli.py): 0 written; 1 a failure that is not the input's (the traceback
is printed); 2 an input to fix (one line ``export: error: ...``): a missing or incomplete folder, a model or
schedule that cannot be converted, diffusers not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from safetensors.torch import load_file

from evaluation.errors import EvaluationError
from evaluation.evaluate import EVALUATED_FILES, checkpoint_of
from pipeline import cli
from pipeline.checkpoint.folder import (
    EMA_FILE,
    STEP_RE,
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    read_ema,
)
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.weights import WEIGHTS_HELP, LoadedUNet, load_unet, unet_with
from pipeline.config import CheckpointConfig, DiffusionConfig, ModelConfig, load_config
from pipeline.data.manifest import sha256_file
from pipeline.files import JSON_MAX_BYTES, SAFETENSORS_HEADER_MAX_BYTES, check_safetensors_header, read_json
from pipeline.model import interop
from pipeline.model.diffusion import Diffusion
from pipeline.model.unet import UNet

EXPORT_RECORD = "ddpm_export.json"
OUTPUT_RTOL = 1e-3  # of the output's scale: float32 rounding is ~1e-6 of it, a wrong mapping O(1)

def chosen_weights(ckpt: Checkpoint, which: str) -> LoadedUNet:
    """``--weights which`` of a checkpoint (pipeline.checkpoint.weights: ema, raw or an EMA's name); EvaluationError
    naming what there is otherwise."""
    try:
        return load_unet(ckpt, which)
    except CheckpointError as exc:
        raise EvaluationError(f"--weights {which}: not one of ema, raw nor an EMA of the checkpoint: {exc}") from None


def open_verified(arg: str | Path, what: str = "CHECKPOINT") -> Checkpoint:
    """A step folder, or a run folder's newest checkpoint whose files match their sha256 (evaluate's rule)."""

    path, note = checkpoint_of(arg)
    if note:
        print(f"{arg} is a run folder: using its newest complete checkpoint {path}", flush=True)
    ckpt = Checkpoint(path, what=what)
    problems = ckpt.verify(list(EVALUATED_FILES))
    if problems:
        raise EvaluationError(f"{path}: {problems[0]}; use another checkpoint")
    return ckpt


def _diffusers() -> Any:
    try:
        # diffusers: an optional extra (interop), ~2 s of import
        import diffusers
    except ImportError:
        raise EvaluationError("diffusers is not installed: pip install -c constraints.txt -e '.[interop]' "
                              "(make install does)") from None
    return diffusers


def _quiet_diffusers() -> None:
    """diffusers' info/warning logs (e.g. on a .to(dtype) cast) are not ours to show."""
    # diffusers: an optional extra (interop), ~2 s of import
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def max_output_diff(net: UNet, model: ModelConfig, unet: Any, timesteps: int) -> tuple[float, float]:
    """(max |ours - diffusers'|, max |ours|) of our U-Net ``net`` and diffusers' ``unet`` on two seeded random
    inputs at t = 0 and T-1, float32 on the CPU; InteropError when they differ by more than float32 rounding
    explains."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, model.channels, model.image_size, model.image_size), generator=g)
    t = torch.tensor([0, timesteps - 1])
    with torch.no_grad():
        a = net.eval()(x, t)
        b = unet.eval()(x, t).sample
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    if not diff <= OUTPUT_RTOL * max(1.0, scale):
        raise interop.InteropError(f"the converted network's output differs from the original's by {diff:.3g} "
                                   f"(output scale {scale:.3g}): the conversion is not exact; nothing was written")
    return diff, scale


# ------------------------------------------------------------------------------------------------ export


def export_diffusers(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> dict[str, Any]:
    """``checkpoint`` (a step folder or a run folder) -> a ``DDPMPipeline`` folder ``out``; returns its record."""
    diffusers = _diffusers()
    _quiet_diffusers()

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvaluationError(f"--diffusers {out} exists and is not an empty folder; choose a new one")
    ckpt = open_verified(checkpoint)
    loaded = chosen_weights(ckpt, weights)
    model, diffusion_cfg, step = loaded.model, loaded.diffusion, loaded.step
    state = loaded.net.state_dict()
    theirs = interop.to_diffusers(state, model)
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**interop.diffusers_unet_config(model))
    unet.load_state_dict(theirs, strict=True, assign=True)
    diff, scale = max_output_diff(loaded.net, model, unet, diffusion_cfg.timesteps)
    scheduler = diffusers.DDPMScheduler(**interop.scheduler_config(diffusion_cfg))
    beta_rel = interop.check_betas(Diffusion(diffusion_cfg).betas, scheduler.betas)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    record = {"checkpoint": str(ckpt.path.resolve()), "step": step, "weights": weights,
              "parameters": sum(v.numel() for v in state.values()), "max_abs_output_diff": diff,
              "output_scale": scale, "max_rel_beta_diff": beta_rel, "diffusers": diffusers.__version__}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------------ import


def _locate(src: Path) -> tuple[Path, Path]:
    """(UNet2DModel folder, scheduler_config.json) of a DDPMPipeline folder or a UNet2DModel folder."""
    if not src.is_dir():
        raise EvaluationError(f"--from-diffusers {src}: no such folder; give a DDPMPipeline folder (model_index.json, "
                              "unet/, scheduler/) or a UNet2DModel folder (config.json)")
    unet_dir = src / "unet" if (src / "unet" / "config.json").is_file() else src
    if not (unet_dir / "config.json").is_file():
        raise EvaluationError(f"--from-diffusers {src}: neither unet/config.json nor config.json is there; give a "
                              "DDPMPipeline folder or a UNet2DModel folder")
    for cand in (src / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
                 unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise EvaluationError(f"--from-diffusers {src}: no scheduler_config.json (looked in scheduler/, beside config.json "
                          "and in ../scheduler/); the schedule decides what the weights mean: give the whole "
                          "DDPMPipeline folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, max_bytes=JSON_MAX_BYTES, what="diffusers config")
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path} is not a JSON object")
    return data


def _with_defaults(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config file's keys over the defaults of ``cls.__init__`` (old files lack newer keys)."""
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _read_unet_weights(unet_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The UNet2DModel weights: safetensors, or a .bin through torch's weights-only unpickler."""

    st, bin_ = unet_dir / "diffusion_pytorch_model.safetensors", unet_dir / "diffusion_pytorch_model.bin"
    try:
        if st.is_file():
            check_safetensors_header(st, max_header_bytes=SAFETENSORS_HEADER_MAX_BYTES, what="UNet2DModel")
            return load_file(str(st)), st
        if bin_.is_file():
            return torch.load(bin_, map_location="cpu", weights_only=True), bin_
    except Exception as exc:  # safetensors' and torch's refusals of a damaged or pickled-code file
        raise EvaluationError(f"{unet_dir}: the weights cannot be read as plain tensors ({str(exc).splitlines()[0]})"
                              ) from None
    raise EvaluationError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin); a sharded or variant "
                          "save is not supported: save the UNet2DModel again with save_pretrained()")


class _NoTrainingState:
    """What CheckpointManager asks of an accelerator, for a checkpoint that has no training state: one process,
    and nothing under accelerate/ (no optimizer, scheduler or RNG state to save)."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        pass


class _Part:
    """A checkpoint part whose state is given (written once, never restored: resume refuses an import)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError("an imported checkpoint cannot be resumed; start from it with train.init_from")


def _record_config(model: ModelConfig, diffusion: DiffusionConfig, out_dir: Path, overrides: list[str]) -> Any:
    """The config.yaml of an import: its model and diffusion sections, the user's ``key=value`` on top (validated by
    load_config); data.shards stays required (``???``) unless given, so that evaluate asks for it."""

    name = out_dir.name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", out_dir.name) else "imported"
    own = [f"model.{k}={json.dumps(v)}" for k, v in vars(model).items()]
    own += [f"diffusion.{k}={json.dumps(v)}" for k, v in vars(diffusion).items()]
    own += [f"name={name}", f"train.out_dir={out_dir}"]
    given_shards = any(o.startswith("data.shards=") for o in overrides)
    cfg = load_config(None, own + list(overrides) + ([] if given_shards else ["data.shards=unset"]))
    if not given_shards:
        cfg.data.shards = MISSING
    if cfg.diffusion != diffusion or dataclasses.replace(cfg.model, dropout=model.dropout) != model:
        raise EvaluationError("model.* and diffusion.* cannot be set on import (model.dropout aside): the diffusers "
                              "configs say what the weights mean")
    return cfg


def import_diffusers(src: str | Path, out: str | Path, overrides: list[str] = ()) -> tuple[Path, dict[str, Any]]:
    """A diffusers DDPM folder -> a complete checkpoint folder of ours; returns (its path, its import record)."""
    diffusers = _diffusers()
    _quiet_diffusers()

    src, out = Path(src), Path(out)
    out_dir, step = (out.parent, int(STEP_RE.match(out.name).group(1))) if STEP_RE.match(out.name) else (out, 0)
    if complete_checkpoints(out_dir) or (out.exists() and out != out_dir):
        raise EvaluationError(f"--out {out} already holds a checkpoint; choose a new folder")
    unet_dir, scheduler_file = _locate(src)
    unet_config = _with_defaults(diffusers.UNet2DModel, _read_json(unet_dir / "config.json"))
    model = interop.model_config_from_diffusers(unet_config)
    scheduler_config = _with_defaults(diffusers.DDPMScheduler, _read_json(scheduler_file))
    diffusion_cfg, notes = interop.diffusion_config_from_scheduler(scheduler_config)
    scheduler = diffusers.DDPMScheduler.from_config(scheduler_config)
    interop.check_betas(Diffusion(diffusion_cfg).betas, scheduler.betas, f"{scheduler_file}")
    theirs, weights_file = _read_unet_weights(unet_dir)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in theirs.values()})
    theirs = {k: v.float() for k, v in theirs.items()}
    ours = interop.from_diffusers(theirs, model)
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**{k: v for k, v in unet_config.items() if k in inspect.signature(
            diffusers.UNet2DModel.__init__).parameters})
    unet.load_state_dict(theirs, strict=True, assign=True)
    diff, scale = max_output_diff(unet_with(ours, model), model, unet, diffusion_cfg.timesteps)

    cfg = _record_config(model, diffusion_cfg, out_dir, list(overrides))
    record = {"format": "diffusers", "source": str(src.resolve()), "unet_config": unet_config,
              "scheduler_config": scheduler_config, "weights_file": weights_file.name,
              "weights_sha256": sha256_file(weights_file), "weights_dtype": dtypes, "max_abs_output_diff": diff,
              "output_scale": scale, "diffusers": diffusers.__version__}
    record = json.loads(json.dumps(record, default=list))  # tuples and the like as meta.json will hold them
    meta = {"step": step, "images_seen": 0, "finished": False, "mlflow_run_id": None, "mlflow_tracking_uri": None,
            interop.IMPORTED: record}
    manager = CheckpointManager(out_dir, CheckpointConfig(), accelerator=_NoTrainingState(), record=cfg,
                                parts={"meta": _Part(meta), "ema": _Part({"weights": ours})})
    manager.start()
    path = manager.save(step)
    return path, {**record, "notes": notes, "model": model, "diffusion": diffusion_cfg}


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m evaluation.export", __doc__)
    p.add_argument("args", nargs="*", metavar="CHECKPOINT | key=value",
                   help="export: the checkpoint (a step-NNNNNNNN folder, or a run folder: its newest); import: "
                        "key=value settings for the checkpoint's config.yaml (e.g. data.shards=DIR)")
    p.add_argument("--diffusers", metavar="OUT_DIR", help="export CHECKPOINT as a DDPMPipeline folder here (new)")
    p.add_argument("--weights", default="ema", help=f"export which weights: {WEIGHTS_HELP}")
    p.add_argument("--from-diffusers", metavar="DIR", help="import this DDPMPipeline (or UNet2DModel) folder")
    p.add_argument("--out", metavar="CHECKPOINT",
                   help="import into this run folder (as step-00000000) or this step-NNNNNNNN folder (new)")
    a = p.parse_args(argv)
    positional = [s for s in a.args if "=" not in s]
    settings = [s for s in a.args if "=" in s]
    if bool(a.diffusers) == bool(a.from_diffusers):
        p.error("give either CHECKPOINT --diffusers OUT_DIR (export) or --from-diffusers DIR --out CHECKPOINT (import)")
    if a.diffusers and (len(positional) != 1 or settings):
        p.error("export takes one CHECKPOINT (a step-NNNNNNNN or run folder) and no key=value settings")
    if a.from_diffusers and (positional or not a.out):
        p.error("import takes --from-diffusers DIR --out CHECKPOINT and optional key=value settings, nothing else")
    return cli.run("export", lambda: _main(a, positional, settings))


def _main(a: argparse.Namespace, positional: list[str], settings: list[str]) -> int:
    if a.diffusers:
        r = export_diffusers(positional[0], a.diffusers, a.weights)
        print(f"exported {r['checkpoint']} ({a.weights} weights, step {r['step']}, {r['parameters']:,} "
              f"parameters) -> {a.diffusers} (DDPMPipeline: unet/, scheduler/)\n"
              f"  outputs agree with ours to {r['max_abs_output_diff']:.2g} (max abs, float32; output scale "
              f"{r['output_scale']:.3g}); β_t to {r['max_rel_beta_diff']:.2g} (relative)\n"
              f"  load it: DDPMPipeline.from_pretrained({str(a.diffusers)!r})")
    else:
        path, r = import_diffusers(a.from_diffusers, a.out, settings)
        print(f"imported {r['source']} ({sum(v.numel() for v in read_ema(path / EMA_FILE)[0].values()):,} "
              f"parameters, {'/'.join(r['weights_dtype'])}) -> {path}\n"
              f"  model: {interop.describe(r['model'])}\n  diffusion: {interop.describe(r['diffusion'])}\n"
              f"  outputs agree with diffusers' to {r['max_abs_output_diff']:.2g} (max abs, float32; output "
              f"scale {r['output_scale']:.3g})")
        for note in r["notes"]:
            print(f"  note: {note}")
        print(f"  evaluate it: python -m evaluation.evaluate --checkpoint {path} data.shards=DATA\n"
              f"  train from it: launch/train.py --config CONFIG train.init_from={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
