"""The EMA U-Net as an MLflow model: seeds (and sampler settings) in, uint8 images out.

This file is the model's code (an MLflow "model from code": MLflow runs it and ``set_model`` at the bottom names
the model); ``pipeline.tracking.logged_model`` logs it with the ``pipeline`` package as its code and a
checkpoint's chosen weights as the artifact ``ema`` (the self-describing ema.safetensors: weights plus model and
diffusion config), read with safetensors: nothing is unpickled. Only MLflow imports this file (loading or
serving the model) and the tests.

    model = mlflow.pyfunc.load_model("models:/digits-ddpm/1")
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}), params={"sampler": "ddim", "steps": 50})
    # uint8 (3, C, H, W): image i from seed i, bitwise what python -m evaluation.evaluate draws for that seed
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from pipeline.checkpoint.weights import load_unet
from pipeline.model.diffusion import Diffusion
from pipeline.model.sampling import sample

SETTINGS = ("sampler", "steps", "eta", "spacing")  # per-request params; their defaults are the checkpoint's eval.*
LOAD_SETTINGS = ("batch_size", "precision", "device")  # load-time model_config; "" device = cuda when available


def _bad(message: str) -> Exception:
    """A request the model refuses: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when served), one line."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class DDPMSampler(PythonModel):
    """``predict(seeds, params)``: one uint8 (C, H, W) image per seed, stacked; the settings override the defaults."""

    def load_context(self, context: Any) -> None:
        config = dict(context.model_config or {})
        self.defaults = {k: config[k] for k in SETTINGS + LOAD_SETTINGS if k in config}
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        loaded = load_unet(context.artifacts["ema"], device=self.device)
        self.diffusion = Diffusion(loaded.diffusion)
        self.net = loaded.net

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
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


set_model(DDPMSampler())  # MLflow runs this file as the model's code ("models from code")
