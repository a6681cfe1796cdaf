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
when set); this command logs any checkpoint's into the run its meta.json names, at its step. The model's code is
pipeline/tracking/mlflow_model.py (an MLflow "model from code", with the ``pipeline`` package inside), its
weights the checkpoint's self-describing ``ema.safetensors`` (or the ``--weights`` chosen), loaded with
safetensors: nothing is unpickled. Sampling is ``pipeline.model.sampling.sample`` with the checkpoint's ``eval.*``
settings as defaults, exactly as ``evaluation.evaluate`` calls it. Details: docs/tracking.md ("The logged model
and the registry").
"""

from __future__ import annotations

import argparse

from evaluation.errors import EvaluationError
from evaluation.export import open_verified
from pipeline import cli
from pipeline.checkpoint.weights import WEIGHTS_HELP
from pipeline.tracking.logged_model import log_checkpoint_model
from pipeline.tracking.sink import read_run_file


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m evaluation.pyfunc_model", __doc__)
    p.add_argument("checkpoint", help="a step-NNNNNNNN folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--weights", default="ema", help=WEIGHTS_HELP)
    p.add_argument("--registered-model-name", default="", help="also register it under this name")
    p.add_argument("--tracking-uri", default="", help="the store (default: the one the checkpoint's meta.json names)")
    a = p.parse_args(argv)
    return cli.run("pyfunc_model", lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
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
    print(f"logged {ckpt.path} ({a.weights} weights, step {ckpt.step}) as {info.model_uri}"
          + (f" in run {run_id}" if run_id else " (no run)")
          + (f"; registered as {a.registered_model_name} version {info.registered_model_version}"
             if a.registered_model_name else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
