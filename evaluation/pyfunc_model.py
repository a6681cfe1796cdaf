"""The EMA U-Net as an MLflow model: seeds (and sampler settings) in, uint8 images out.

    python -m evaluation.pyfunc_model runs/digits                        # its newest checkpoint, into its run
    python -m evaluation.pyfunc_model runs/digits/step-00004000 --registered-model-name digits-ddpm

    model = mlflow.pyfunc.load_model("models:/digits-ddpm/1")
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}), params={"sampler": "ddim", "steps": 50})
    # uint8 (3, C, H, W): image i from seed i, bitwise what python -m evaluation.evaluate draws for that seed

    mlflow models serve -m models:/digits-ddpm/1 --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["seed"], "data": [[0], [1]]}, "params": {"steps": 20}}'

The training logs one at its end (``tracking.log_model``, registered under ``tracking.registered_model_name``
when set); this command logs any checkpoint's into the run its meta.json names, at its step. The model is an
MLflow "model from code": this file is the model's code (MLflow runs it; ``set_model`` at the bottom), the
``pipeline`` package goes inside the model (``code_paths``: the code the weights were trained with, and no
package index needed at serving time), the weights go inside as ``ema.safetensors`` (the checkpoint's
self-describing file: weights plus model and diffusion config), loaded with safetensors: nothing is unpickled.
Sampling is ``pipeline.sampling.sample`` with the checkpoint's ``eval.*`` settings as defaults, exactly as
``evaluation.evaluate`` calls it. Details: docs/tracking.md ("The logged model and the registry").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"  # what the model's code imports
MODEL_NAME = "ema_model"  # the logged model's name in the run
SETTINGS = ("sampler", "steps", "eta", "spacing")  # per-request params; their defaults are the checkpoint's eval.*
LOAD_SETTINGS = ("batch_size", "precision", "device")  # load-time model_config; "" device = cuda when available


def _bad(message: str) -> Exception:
    """A request the model refuses: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when served), one line."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class DDPMSampler(PythonModel):
    """``predict(seeds, params)``: one uint8 (C, H, W) image per seed, stacked; the settings override the defaults."""

    def load_context(self, context: Any) -> None:
        import torch

        from pipeline.checkpoint import read_ema
        from pipeline.config import DiffusionConfig, ModelConfig
        from pipeline.diffusion import Diffusion
        from pipeline.unet import UNet

        weights, meta = read_ema(context.artifacts["ema"])
        config = dict(context.model_config or {})
        self.defaults = {k: config[k] for k in SETTINGS + LOAD_SETTINGS if k in config}
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.diffusion = Diffusion(DiffusionConfig(**meta["diffusion"]))
        net = UNet(ModelConfig(**meta["model"]))
        net.load_state_dict({k: v.float() for k, v in weights.items()})
        self.net = net.to(self.device).eval().requires_grad_(False)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        from pipeline.sampling import sample

        seeds = _seeds(model_input)
        s = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(params or {}) - set(SETTINGS))
        if unknown:
            raise _bad(f"unknown params {unknown}; the settings are {list(SETTINGS)}")
        if s.get("sampler") not in ("ddim", "ancestral"):
            raise _bad(f"sampler={s.get('sampler')!r}: choose 'ddim' or 'ancestral'")
        T = self.diffusion.num_timesteps
        if s["sampler"] == "ddim" and not (isinstance(s.get("steps"), (int, np.integer)) and 1 <= s["steps"] <= T):
            raise _bad(f"steps={s.get('steps')!r}: DDIM steps must be an integer in 1..{T}")
        if not (isinstance(s.get("eta"), (int, float)) and 0.0 <= float(s["eta"]) <= 1.0):  # False for NaN
            raise _bad(f"eta={s.get('eta')!r} must be a number in [0, 1]")
        try:
            images = sample(self.net, self.diffusion, seeds, sampler=s["sampler"], steps=int(s["steps"]),
                            eta=float(s["eta"]), batch_size=int(s.get("batch_size", 64)), device=self.device,
                            spacing=s.get("spacing", "uniform"), precision=s.get("precision", "fp32"))
        except ValueError as exc:  # the sampler's own refusals (e.g. a spacing it does not have)
            raise _bad(str(exc)) from None
        return images.numpy()


def _seeds(model_input: Any) -> list[int]:
    """The ``seed`` column of a DataFrame (or a dict's ``seed`` list): non-negative integers."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "seed" not in frame.columns or len(frame) == 0:
        raise _bad(f"the input needs a non-empty column 'seed' (one integer per image); got columns "
                   f"{list(frame.columns)}")
    col = frame["seed"]
    if not pd.api.types.is_integer_dtype(col) or (col < 0).any():
        raise _bad("seed must hold non-negative integers (image i is drawn from seed i)")
    return [int(s) for s in col]


# ----------------------------------------------------------------------------------------------- logging


def _requirements() -> list[str]:
    """The packages the model's code imports, pinned to this environment's versions (no inference run needed)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "numpy", "pandas", "safetensors", "omegaconf")]


def _eval_defaults(ckpt: Any) -> dict[str, Any]:
    """The checkpoint's eval.* section (what evaluate samples with); the defaults where config.yaml lacks one."""
    from omegaconf import OmegaConf

    from pipeline.config import EvalConfig

    try:
        section = OmegaConf.load(ckpt.path / "config.yaml").get("eval") or {}
        e = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), section))
    except Exception:  # an older or hand-made config.yaml: sampling still works with the defaults
        e = EvalConfig()
    return {"sampler": e.sampler, "steps": e.steps, "eta": float(e.eta),
            "spacing": getattr(e, "spacing", "uniform"), "batch_size": e.batch_size, "precision": e.precision}


def log_checkpoint_model(checkpoint: str | Path, *, tracking_uri: str, run_id: str | None, weights: str = "ema",
                         registered_model_name: str = "", name: str = MODEL_NAME) -> Any:
    """Log a checkpoint's weights as a pyfunc model of ``run_id`` at the checkpoint's step (and register it); returns
    MLflow's ModelInfo. Sets this process's MLflow tracking and registry URI to ``tracking_uri``."""
    import tempfile

    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from evaluation.export import checkpoint_model, export_weights, open_verified
    from pipeline.checkpoint import EMA_FILE, export_ema

    ckpt = open_verified(checkpoint)
    model_cfg, diffusion_cfg, step = checkpoint_model(ckpt)
    defaults = _eval_defaults(ckpt)
    shape = (-1, int(model_cfg.channels), int(model_cfg.image_size), int(model_cfg.image_size))
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        params=ParamSchema([ParamSpec("sampler", "string", defaults["sampler"]),
                            ParamSpec("steps", "long", int(defaults["steps"])),
                            ParamSpec("eta", "double", float(defaults["eta"])),
                            ParamSpec("spacing", "string", defaults["spacing"])]),
    )
    # Cheap to run (MLflow predicts on it to validate the model before logging): 2 images, <= 10 DDIM steps.
    example = (pd.DataFrame({"seed": [0, 1]}), {"sampler": "ddim", "steps": min(10, diffusion_cfg.timesteps)})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if run_id:
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        ema = ckpt.path / EMA_FILE
        if weights != "ema":  # any other average: the same self-describing file, written from its tensors
            ema = Path(tmp) / EMA_FILE
            export_ema(ema, export_weights(ckpt, weights, model_cfg),
                       argparse.Namespace(model=model_cfg, diffusion=diffusion_cfg), step=step)
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, step=step, python_model=str(Path(__file__).resolve()),
            code_paths=[str(PACKAGE)], artifacts={"ema": str(ema)}, signature=signature, input_example=example,
            pip_requirements=_requirements(), model_config={**defaults, "device": ""},
            registered_model_name=registered_model_name or None, await_registration_for=60,
            metadata={"ddpm": {"checkpoint": str(ckpt.path.resolve()), "step": step, "weights": weights,
                               "output": "uint8 (N, C, H, W); image i from seed i"}},
            tags={"ddpm.step": str(step), "ddpm.weights": weights},
        )


def log_training_model(checkpoint: Path, tracking: Any, run_id: str | None, tracking_uri: str | None) -> None:
    """The training's end: log the final checkpoint's EMA model into its run; never raises (a warning instead)."""
    if not run_id or not tracking_uri:
        print("warning: the EMA model was not logged to MLflow: the training has no MLflow run (the store was not "
              "reachable); log it later with python -m evaluation.pyfunc_model", file=sys.stderr, flush=True)
        return
    t0 = time.perf_counter()
    try:
        info = log_checkpoint_model(checkpoint, tracking_uri=tracking_uri, run_id=run_id,
                                    registered_model_name=tracking.registered_model_name)
    except Exception as exc:  # the model is a convenience: a failure here must not fail the finished training
        line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        print(f"warning: the EMA model of {checkpoint} was not logged to MLflow ({type(exc).__name__}: {line}); log it "
              f"later with python -m evaluation.pyfunc_model {checkpoint}", file=sys.stderr, flush=True)
        return
    print(f"logged the EMA weights of {checkpoint.name} as MLflow model {info.model_uri}"
          + (f", registered as {tracking.registered_model_name} version {info.registered_model_version}"
             if tracking.registered_model_name else "") + f" ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    from evaluation.compare import DefaultsHelpFormatter
    from evaluation.errors import EvaluationError
    from pipeline.checkpoint import CheckpointError
    from pipeline.tracking import read_run_file

    p = argparse.ArgumentParser(prog="python -m evaluation.pyfunc_model", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", help="a step-NNNNNNNN folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--weights", default="ema", help="which weights (python -m evaluation.export --help)")
    p.add_argument("--registered-model-name", default="", help="also register it under this name")
    p.add_argument("--tracking-uri", default="", help="the store (default: the one the checkpoint's meta.json names)")
    a = p.parse_args(argv)
    try:
        from evaluation.export import open_verified

        ckpt = open_verified(a.checkpoint)
        run_id, uri = ckpt.meta.get("mlflow_run_id"), ckpt.meta.get("mlflow_tracking_uri")
        if not run_id:
            recorded = read_run_file(ckpt.path.parent)
            run_id, uri = (recorded["run_id"], recorded["tracking_uri"]) if recorded else (None, uri)
        uri = a.tracking_uri or uri
        if not uri:
            raise EvaluationError(f"{ckpt.path} names no MLflow store (tracking was off); give --tracking-uri")
        info = log_checkpoint_model(ckpt.path, tracking_uri=uri, run_id=run_id, weights=a.weights,
                                    registered_model_name=a.registered_model_name)
    except (EvaluationError, CheckpointError) as exc:
        print(f"pyfunc_model: error: {exc}", file=sys.stderr)
        return 2
    print(f"logged {ckpt.path} ({a.weights} weights, step {ckpt.step}) as {info.model_uri}"
          + (f" in run {run_id}" if run_id else " (no run)")
          + (f"; registered as {a.registered_model_name} version {info.registered_model_version}"
             if a.registered_model_name else ""))
    return 0


set_model(DDPMSampler())  # MLflow runs this file as the model's code ("models from code")

if __name__ == "__main__":
    raise SystemExit(main())
