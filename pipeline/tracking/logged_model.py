"""Log a checkpoint's weights as an MLflow model (the model's code: pipeline/tracking/mlflow_model.py), into the
training's run at the checkpoint's step, optionally registered. The training logs its final EMA this way
(``tracking.log_model``); ``python -m evaluation.pyfunc_model`` logs any checkpoint's. The model is an MLflow
"model from code": ``mlflow_model.py`` is its code, the ``pipeline`` package goes inside it (``code_paths``: the
code the weights were trained with, no package index needed at serving time), the weights go inside as
``ema.safetensors``. Details: docs/tracking.md ("The logged model and the registry").
"""

from __future__ import annotations

import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline.checkpoint.folder import EMA_FILE, Checkpoint, export_ema
from pipeline.checkpoint.weights import PRIMARY_NAMES, load_unet
from pipeline.config import EvalConfig

PACKAGE = Path(__file__).resolve().parents[1]  # the pipeline package: the model's code imports it
MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")  # the file MLflow runs as the model
MODEL_NAME = "ema_model"  # the logged model's name in the run


def _requirements() -> list[str]:
    """The packages the model's code imports, pinned to this environment's versions (no inference run needed)."""
    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "numpy", "pandas", "safetensors", "omegaconf")]


def _eval_defaults(ckpt: Any) -> dict[str, Any]:
    """The checkpoint's eval.* section (what evaluate samples with); the defaults where config.yaml lacks one."""
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
    MLflow's ModelInfo. Sets this process's MLflow tracking and registry URI to ``tracking_uri``. ``checkpoint``: a
    complete step folder; ``weights``: a name of pipeline.checkpoint.weights (every file read is verified)."""
    # mlflow (and pandas, which it imports) here: ~1.5 s of import that only the process logging a model pays
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    ckpt = Checkpoint(checkpoint)
    loaded = load_unet(ckpt, weights)
    model_cfg, diffusion_cfg, step = loaded.model, loaded.diffusion, loaded.step
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
        if weights not in PRIMARY_NAMES:  # any other average: the same self-describing file, from its tensors
            ema = Path(tmp) / EMA_FILE
            export_ema(ema, loaded.net.state_dict(), SimpleNamespace(model=model_cfg, diffusion=diffusion_cfg), step=step)
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, step=step, python_model=str(MODEL_CODE),
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
