"""Named evaluation protocols: ``eval.protocol=NAME`` sets every ``eval.*`` key that defines a published figure.

``paper`` is Ho et al. 2020, Table 1 (CIFAR-10: FID 3.17, NLL <= 3.75 bits/dim): the 1000-step ancestral
sampler with sigma_t^2 = beta_t (``diffusion.variance=fixedlarge``) on the EMA weights, 50,000 samples, FID and
KID with TF-Inception features (clean-fid's ``legacy_tensorflow``) against clean-fid's CIFAR-10 train
statistics, and the bound in bits/dim summed over all T terms on the 10,000 test images.

A ``key=value`` given in the same command wins over the protocol, with a printed line, and the figures are then
recorded as protocol ``paper, modified`` with the keys that differ (``protocol_overrides`` in the provenance);
keys the checkpoint's config.yaml set otherwise (its training-time ``eval.*`` section) are replaced, also with a
printed line. A checkpoint whose ``diffusion.variance`` is not fixedlarge is refused: its ancestral samples would
not be the paper's (docs/fid.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evaluation.errors import EvaluationError
from pipeline.config import Config

PAPER: dict[str, Any] = {
    "sampler": "ancestral",  # Algorithm 2 over all T steps (eval.steps, eta and spacing are then unused)
    "use_ema": True,
    "precision": "fp32",
    "num_samples": 50_000,
    "feature_extractor": "inception",
    "fid_mode": "legacy_tensorflow",  # TF-Inception features, as TTUR's FID code computed them
    "reference": "clean-fid:cifar10/train/32",
    "kid_subsets": 100,  # clean-fid's KID defaults (KID is not in the paper)
    "kid_subset_size": 1000,
    "bpd_split": "test",
    "bpd_timesteps": 0,  # the exact sum over all T terms
    "bpd_max_images": 10_000,  # all of CIFAR-10's test split
}
PROTOCOLS: dict[str, dict[str, Any]] = {"paper": PAPER}
# what the protocol needs of the checkpoint itself (not eval.* keys: refused, never changed)
REQUIRES: dict[str, dict[str, str]] = {"paper": {"variance": "fixedlarge"}}
MODIFIED = ", modified"


def given_eval_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The eval.* keys named by ``key=value`` overrides (``eval.num_samples=8`` -> ``num_samples``)."""
    return {o.split("=", 1)[0].strip().removeprefix("eval.") for o in overrides if o.strip().startswith("eval.")}


def apply_protocol(cfg: Config, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, list[str]]:
    """``cfg`` with ``eval.protocol``'s settings (in place) and the lines to print about what it set or left.

    Raises EvaluationError for a checkpoint the protocol does not fit, ConfigError (EvalConfig's checks) for a
    combination that cannot run (e.g. eval.feature_extractor=digits against the protocol's clean-fid reference).
    """
    name = cfg.eval.protocol
    if not name:
        return cfg, []
    preset, given = PROTOCOLS[name], given_eval_keys(overrides)
    for key, want in REQUIRES[name].items():
        have = getattr(cfg.diffusion, key)
        if have != want:
            raise EvaluationError(
                f"eval.protocol={name} samples with diffusion.{key}={want} (sigma_t^2 = beta_t, the paper's "
                f"CIFAR-10 sampler), but this checkpoint's config has diffusion.{key}={have}: its figures would not "
                f"be the paper's. Evaluate without eval.protocol, or add diffusion.{key}={want} to sample this "
                "network with sigma_t^2 = beta_t (the variance is fixed, not learned: training does not depend on it)"
            )
    changes, replaced, kept = {}, [], []
    for key, want in preset.items():
        have = getattr(cfg.eval, key)
        if have == want:
            continue
        if key in given:
            kept.append(f"eval.{key}={have} (protocol: {want})")
        else:
            changes[key] = want
            replaced.append(f"eval.{key}={want} (config.yaml: {have})")
    cfg.eval = dataclasses.replace(cfg.eval, **changes)  # EvalConfig's own checks, on the combination
    lines = [f"eval.protocol={name}: sets " + ", ".join(replaced)] if replaced else []
    if kept:
        lines.append(f"eval.protocol={name}: the command line's " + ", ".join(kept) + " win; the figures are "
                     f"recorded as protocol '{name}{MODIFIED}', not comparable with the paper's")
    return cfg, lines


def overridden(cfg: Config) -> dict[str, Any]:
    """{eval key: value used} where the evaluation departs from its named protocol ({} without one)."""
    preset = PROTOCOLS.get(cfg.eval.protocol, {})
    return {k: getattr(cfg.eval, k) for k, want in preset.items() if getattr(cfg.eval, k) != want}


def recorded_name(cfg: Config) -> str:
    """What the provenance and the MLflow tags record: ``paper``, ``paper, modified`` or ``custom`` (no name)."""
    if not cfg.eval.protocol:
        return "custom"
    return cfg.eval.protocol + (MODIFIED if overridden(cfg) else "")
