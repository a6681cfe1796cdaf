"""Typed configuration: one dataclass per component, YAML files plus ``key=value`` overrides.

Merging and type checking are OmegaConf's (structured configs); what is ours is the validation in
each ``__post_init__``, whose messages name the key, the value and what is allowed.

    cfg = load_config("configs/digits.yaml", ["train.total_steps=200", "data.num_workers=0"])
    cfg.train.lr                      # typed attribute access
    to_yaml(cfg); flatten(cfg)        # for the checkpoint and for tracking params

Each component is given only its own sub-config (``cfg.data`` to the loader, ``cfg.model`` to the
U-Net, ...), never the whole object.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse as parse_interpolation

from pipeline.cli import InputError


class ConfigError(ValueError, InputError):
    """An invalid configuration. The message names the key and says what is allowed."""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):  # NaN fails every comparison
        finite = "" if math.isfinite(value) else "a finite number "
        raise ConfigError(f"{key}={value!r} must be {finite}{'>= 0' if zero_ok else '> 0'}")


def _unit_interval(key: str, value: float, *, closed: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0  # False for NaN
    if not ok:
        raise ConfigError(f"{key}={value!r} must lie in {'[0, 1]' if closed else '(0, 1)'}")


@dataclass
class DataConfig:
    """The streaming loader (pipeline/data/loader.py)."""

    shards: str = MISSING  # a prepared folder (its manifest.json), a manifest path, a brace pattern or URLs
    split: str = "train"  # which split of the manifest to stream
    mode: str = "exact"  # exact: each sample once per epoch on all ranks; resampled: infinite, with replacement
    num_workers: int = 2  # DataLoader worker processes per rank (0 = load in the training process)
    shuffle_buffer: int = 1000  # samples held in each worker's shuffle buffer
    hflip: bool = True  # random horizontal flip (the paper's CIFAR-10 augmentation)
    seed: int = 0  # seeds the shard and sample order together with the epoch
    strict: bool = False  # raise on a corrupt shard or sample instead of counting and skipping it
    prefetch_factor: int = 2  # batches prefetched per worker
    verify: str = "stream"  # shards vs their manifest sha256: stream (as read), start (all at start), off
    # the manifest.json (path or URL) of a shard pattern or URL list, e.g. of pipe: commands: counts for exact mode
    manifest: str = ""

    def __post_init__(self) -> None:
        _choice("data.mode", self.mode, ("exact", "resampled"))
        if self.verify == "False":  # YAML, and so a key=value override, reads a bare off (or false, no) as false
            self.verify = "off"
        _choice("data.verify", self.verify, ("stream", "start", "off"))
        _positive("data.num_workers", self.num_workers, zero_ok=True)
        _positive("data.shuffle_buffer", self.shuffle_buffer, zero_ok=True)
        _positive("data.prefetch_factor", self.prefetch_factor)


def default_attention(image_size: int, levels: int) -> list[int]:
    """The attention rule when model.attn_resolutions is unset (docs/model.md): the paper's 16x16 where the U-Net
    has a 16x16 level (its 32x32 and 256x256 networks), else the lowest resolution (where the middle block
    attends too: 4x4 for the 8x8 digits)."""
    resolutions = [image_size // 2**i for i in range(levels)]
    return [16] if 16 in resolutions else [resolutions[-1]]


@dataclass
class ModelConfig:
    """The paper's U-Net (pipeline/model/unet.py). Widths default to the CIFAR-10 network (35.7M parameters at 32x32x3).

    The geometry (image_size, channels) is the data's: unset (null), the trainer takes it from the prepared
    data's manifest.json and refuses a config that sets a different one (pipeline/geometry.py).
    """

    image_size: int | None = None  # height = width of the images, in pixels; null = from the data
    channels: int | None = None  # image channels, 1 (grey) or 3 (RGB); null = from the data
    base_channels: int = 128  # channels at the first resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per resolution level
    # resolutions (pixels) with self-attention; null = the rule in default_attention (16x16 where reached)
    attn_resolutions: list[int] | None = None
    dropout: float = 0.1  # dropout inside the residual blocks
    num_heads: int = 1  # attention heads (the paper uses 1)

    @property
    def resolved(self) -> bool:
        """Whether the geometry is known (set, or filled in from the data)."""
        return self.image_size is not None and self.channels is not None

    def __post_init__(self) -> None:
        _positive("model.base_channels", self.base_channels)
        if self.base_channels % 32:
            raise ConfigError(f"model.base_channels={self.base_channels} must be a multiple of 32 (GroupNorm(32))")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ConfigError(f"model.channel_mult={list(self.channel_mult)} must be a non-empty list of positive ints")
        _positive("model.num_res_blocks", self.num_res_blocks)
        _unit_interval("model.dropout", self.dropout)
        _positive("model.num_heads", self.num_heads)
        if self.channels is not None:
            _choice("model.channels", self.channels, (1, 3))
        if self.image_size is None:
            return  # the rest depends on the image size: checked again once the data has given it
        _positive("model.image_size", self.image_size)
        downsamples = len(self.channel_mult) - 1
        if self.image_size % (2**downsamples):
            raise ConfigError(
                f"model.image_size={self.image_size} must be divisible by 2**{downsamples} "
                f"(one downsampling per extra entry of model.channel_mult={list(self.channel_mult)}): "
                "shorten model.channel_mult or prepare the images at another --size"
            )
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        if self.attn_resolutions is None:
            self.attn_resolutions = default_attention(self.image_size, len(self.channel_mult))
        unreached = [r for r in self.attn_resolutions if r not in resolutions]
        if unreached:  # a warning, not an error: overriding only image_size on a preset is common in tests
            warnings.warn(
                f"model.attn_resolutions={list(self.attn_resolutions)}: {unreached} is not a resolution of this "
                f"U-Net, so no attention is added there; with model.image_size={self.image_size} and "
                f"{len(self.channel_mult)} levels the resolutions are {resolutions} (leave "
                "model.attn_resolutions unset for the rule in docs/model.md)",
                stacklevel=2,
            )
        # Attention runs at the listed resolutions and always in the middle block (the lowest resolution).
        attn_widths = {self.base_channels * self.channel_mult[-1]} | {
            self.base_channels * self.channel_mult[resolutions.index(r)]
            for r in self.attn_resolutions
            if r in resolutions
        }
        if any(w % self.num_heads for w in attn_widths):
            raise ConfigError(
                f"model.num_heads={self.num_heads} must divide the channels of every attention block "
                f"({sorted(attn_widths)})"
            )


@dataclass
class DiffusionConfig:
    """The forward process and the reverse-process parameterisation (pipeline/model/diffusion.py)."""

    timesteps: int = 1000  # T
    schedule: str = "linear"  # linear (the paper's) or cosine (improved DDPM)
    beta_start: float = 1e-4  # β_1 of the linear schedule
    beta_end: float = 0.02  # β_T of the linear schedule
    # what the network predicts: eps (the paper's default), x0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x0 (Salimans & Ho 2022;
    # keeps x̂0 sane near t = T, where an ε error is multiplied by √(1/ᾱ_t − 1): docs/model.md)
    prediction: str = "eps"
    variance: str = "fixedlarge"  # reverse variance σ_t²: fixedlarge = β_t (paper CIFAR-10), fixedsmall = β̃_t

    def __post_init__(self) -> None:
        _positive("diffusion.timesteps", self.timesteps)
        _choice("diffusion.schedule", self.schedule, ("linear", "cosine"))
        _unit_interval("diffusion.beta_start", self.beta_start, closed=False)
        _unit_interval("diffusion.beta_end", self.beta_end, closed=False)
        if self.beta_start > self.beta_end:
            raise ConfigError(
                f"diffusion.beta_start={self.beta_start} must not exceed diffusion.beta_end={self.beta_end}"
            )
        _choice("diffusion.prediction", self.prediction, ("eps", "x0", "v"))
        _choice("diffusion.variance", self.variance, ("fixedlarge", "fixedsmall"))


@dataclass
class TrainConfig:
    """The training run (pipeline/train/loop.py): batch, length, precision, determinism. Steps are optimizer steps."""

    out_dir: str = ""  # checkpoints and exported weights go under here; "" = runs/<name>
    batch_size: int = 128  # global batch: all ranks and accumulation steps together
    micro_batch_per_gpu: int = 0  # per-device batch per forward; 0 = batch_size / world_size (no accumulation)
    total_steps: int = 800_000  # optimizer steps to train for
    # no | bf16 | fp16 (fp16 needs a GPU; loss scaling is automatic) | auto: bf16 where the device computes it
    # natively (a GPU that supports it; a CPU with AVX512_BF16 or AMX), else no (pipeline/train/step.py)
    mixed_precision: str = "no"
    seed: int = 0  # seeds weights, noise and t; per-rank streams derive from it
    deterministic: bool = False  # torch deterministic algorithms (bitwise resume on CPU)
    nonfinite_policy: str = "skip"  # on a non-finite loss: skip the step, or stop
    max_nonfinite_in_row: int = 10  # with skip: stop after this many non-finite steps in a row
    compile: bool = False  # torch.compile the U-Net
    channels_last: bool = False  # channels_last memory format
    grad_comm_dtype: str = "fp32"  # dtype of the gradient all-reduce: fp32 | bf16 (half the bytes; docs/training.md)
    # GPU numerics (docs/training.md, "GPU numerics and timeouts"): TF32 for float32 matmuls and convolutions
    # (off: float32 means IEEE float32, as in EDM; bf16/fp16 autocast regions are not affected), cuDNN's
    # autotuner (on, as in EDM; off under train.deterministic)
    tf32: bool = False
    cudnn_benchmark: bool = True
    # every process group's timeout: a collective that waits longer fails instead of hanging; long enough for
    # rank-0-only work between collectives (checkpoint hashing ~1 s/GB, a sample grid)
    dist_timeout_s: float = 1800.0
    # the GPU's dense peak TFLOP/s for the tick's MFU; 0 = from the table of known GPUs (pipeline/train/flops.py)
    peak_tflops: float = 0.0
    # start from these EMA weights (a checkpoint folder, a run folder: its newest, or an imported checkpoint of
    # python -m evaluation.export --from-diffusers): weights only, new optimizer, step 0; ignored when resuming
    init_from: str = ""

    def __post_init__(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _choice("train.grad_comm_dtype", self.grad_comm_dtype, ("fp32", "bf16"))
        _positive("train.micro_batch_per_gpu", self.micro_batch_per_gpu, zero_ok=True)
        _positive("train.total_steps", self.total_steps)
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"  # YAML 1.1 reads a bare `no` (in a file or key=value) as false
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16", "auto"))
        _choice("train.nonfinite_policy", self.nonfinite_policy, ("skip", "stop"))
        _positive("train.max_nonfinite_in_row", self.max_nonfinite_in_row)
        _positive("train.peak_tflops", self.peak_tflops, zero_ok=True)
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"train.dist_timeout_s={self.dist_timeout_s} must be > 0 (seconds a collective may "
                              "wait before the run fails; default 1800)")
        if self.micro_batch_per_gpu and self.batch_size % self.micro_batch_per_gpu:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.micro_batch_per_gpu={self.micro_batch_per_gpu}"
            )


@dataclass
class OptimizerConfig:
    """Adam and its learning-rate schedule (pipeline/train/loop.py): the paper's linear warm-up, then constant."""

    lr: float = 2e-4  # Adam learning rate after warm-up
    warmup_steps: int = 5000  # linear learning-rate warm-up, in optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # > 0: clip the gradient of each group of this many images on its own (global norm <= grad_clip), then average
    # over all groups of the batch: the authors' per-TPU-replica clipping (16 of 128; docs/training.md). 0 = clip
    # the batch gradient once
    grad_clip_per: int = 0
    # true: the authors' lr * min(step / warmup_steps, 1), so the first step has lr 0; false: (step + 1) / warmup_steps
    warmup_from_zero: bool = False

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.warmup_steps", self.warmup_steps, zero_ok=True)
        _positive("optimizer.grad_clip_per", self.grad_clip_per, zero_ok=True)
        if self.grad_clip_per and not self.grad_clip:
            raise ConfigError(f"optimizer.grad_clip_per={self.grad_clip_per} clips each group's gradient to "
                              "optimizer.grad_clip, which is 0 (off); set optimizer.grad_clip (the paper: 1.0) or "
                              "optimizer.grad_clip_per=0")
        for key, beta in (("optimizer.adam_beta1", self.adam_beta1), ("optimizer.adam_beta2", self.adam_beta2)):
            if not 0.0 <= beta < 1.0:  # beta = 1 makes Adam's bias correction divide by zero
                raise ConfigError(f"{key}={beta!r} must lie in [0, 1) (e.g. 0.9 / 0.999)")
        _positive("optimizer.adam_eps", self.adam_eps)
        _positive("optimizer.weight_decay", self.weight_decay, zero_ok=True)
        _positive("optimizer.grad_clip", self.grad_clip, zero_ok=True)


SIGMA_REL_MAX = 12 ** -0.5  # a power-function EMA's sigma_rel at exponent 0 (EDM2 eq. 4): larger needs exponent < 0


@dataclass
class PostHocConfig:
    """Power-function EMAs and their snapshots for choosing the EMA after training (EDM2; pipeline/checkpoint/posthoc.py)."""

    sigma_rels: list[float] = field(default_factory=list)  # [] = off; EDM2 keeps [0.05, 0.10]
    # snapshot every this many steps, in the checkpoint of that step (a checkpoint is written there if none is
    # due); 0 = at every multiple of checkpoint.every_steps
    snapshot_every_steps: int = 0
    snapshot_dtype: str = "fp16"  # fp16 (EDM2's, ema-pytorch's) | bf16 | fp32

    def __post_init__(self) -> None:
        for s in self.sigma_rels:
            if not 0.0 < s < SIGMA_REL_MAX:  # False for NaN
                raise ConfigError(f"ema.posthoc.sigma_rels: {s!r} must lie in (0, {SIGMA_REL_MAX:.4f}) (the relative "
                                  "width of a power-function EMA; EDM2 keeps [0.05, 0.10])")
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(f"ema.posthoc.sigma_rels={list(self.sigma_rels)} repeats a value; list each once")
        _positive("ema.posthoc.snapshot_every_steps", self.snapshot_every_steps, zero_ok=True)
        _choice("ema.posthoc.snapshot_dtype", self.snapshot_dtype, ("fp16", "bf16", "fp32"))


@dataclass
class EMAConfig:
    """The EMA of the weights (pipeline/train/ema.py): ema-pytorch's warm-up, fp32, masked on skipped steps."""

    decay: float = 0.9999  # EMA decay once warmed up
    warmup_steps: int = 0  # steps before the EMA starts tracking (it copies the weights until then)
    update_every: int = 1  # update the EMA every this many steps
    power: float = 0.75  # warm-up: decay = min(decay, 1 - (1 + n)^-power) after n updates (ema-pytorch)
    # power: ema-pytorch's warm-up above; none: the authors' plain EMA, a copy at the first update, then the
    # constant decay
    warmup: str = "power"
    decays: list[float] = field(default_factory=list)  # more classic EMAs kept beside `decay` (same schedule)
    posthoc: PostHocConfig = field(default_factory=PostHocConfig)

    def __post_init__(self) -> None:
        _unit_interval("ema.decay", self.decay)
        _positive("ema.warmup_steps", self.warmup_steps, zero_ok=True)
        _positive("ema.update_every", self.update_every)
        _positive("ema.power", self.power)
        _choice("ema.warmup", self.warmup, ("power", "none"))
        for d in self.decays:
            _unit_interval("ema.decays", d)
        if len({self.decay, *self.decays}) != 1 + len(self.decays):
            raise ConfigError(f"ema.decays={list(self.decays)} repeats a decay (ema.decay={self.decay} is kept "
                              "already); list each other decay once")


@dataclass
class CheckpointConfig:
    """Training-state checkpoints (pipeline/checkpoint/): cadence, retention, where to resume from."""

    every_steps: int = 5000  # checkpoint cadence, in optimizer steps (and always at the end)
    keep: int = 3  # newest k complete checkpoints kept
    resume: str = "auto"  # auto (newest complete checkpoint in train.out_dir, else fresh) | none | a checkpoint path

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.keep", self.keep)
        if not self.resume:
            raise ConfigError("checkpoint.resume must be auto, none or a step-NNNNNNNN folder")


@dataclass
class LoggingConfig:
    """What the trainer reports (pipeline/train/loop.py): the metrics tick and the EMA sample grids."""

    every_steps: int = 100  # metrics tick: the only place the host waits for the device
    sample_every_steps: int = 5000  # sample grid from the EMA into tracking (0 = off)
    sample_grid_images: int = 16  # images in that grid
    sample_ddim_steps: int = 20  # DDIM steps for that grid

    def __post_init__(self) -> None:
        _positive("logging.every_steps", self.every_steps)
        _positive("logging.sample_every_steps", self.sample_every_steps, zero_ok=True)
        _positive("logging.sample_grid_images", self.sample_grid_images)
        _positive("logging.sample_ddim_steps", self.sample_ddim_steps)


@dataclass
class PreemptionConfig:
    """SIGTERM/SIGUSR1 handling (pipeline/train/loop.py): checkpoint, then exit 75 so the job is requeued."""

    # the ranks' signal flags are exchanged (without waiting) after every this-many steps and read one step later:
    # a signal is acted on within this + 1 steps (plus the checkpoint); 1 costs a host all-reduce over gloo per step
    check_every_steps: int = 1

    def __post_init__(self) -> None:
        _positive("preemption.check_every_steps", self.check_every_steps)


@dataclass
class EvalConfig:
    """The evaluation stage (evaluation/)."""

    # a named protocol that sets the eval.* keys it fixes ("" = none): paper = Ho et al.'s CIFAR-10 Table 1
    # (evaluation/protocol.py, docs/fid.md); a key=value given with it wins, with a printed line
    protocol: str = ""
    num_samples: int = 10_000  # generated images for FID/KID; image i comes from seed seed + i
    seed: int = 0  # first per-image seed
    sampler: str = "ddim"  # ancestral (T steps, the paper's) or ddim
    steps: int = 50  # DDIM steps (ignored by the ancestral sampler)
    # DDIM timesteps (pipeline/model/sampling.py): uniform (the DDIM code's range(0, T, T // steps)), leading, linspace,
    # trailing (diffusers' names) or quadratic
    spacing: str = "uniform"
    eta: float = 0.0  # DDIM η (0 = deterministic, 1 = ancestral-like)
    precision: str = "fp32"  # the network while sampling: fp32, or bf16 autocast (faster on GPUs; docs/fid.md)
    batch_size: int = 256  # images per network call while sampling
    use_ema: bool = True  # evaluate the EMA weights (the paper's) or the raw ones
    # inception (clean-fid's InceptionV3), digits (the bundled demo net), or none (no FID/KID: bits/dim and grids)
    feature_extractor: str = "inception"
    fid_mode: str = "clean"  # clean-fid mode: clean | legacy_pytorch | legacy_tensorflow
    reference: str = "train"  # reference statistics: a split of the data shards, or clean-fid:<name>/<split>/<res>
    # path to inception-2015-12-05.pt ("" = the per-user cache ~/.cache/ddpm-pipeline, downloaded there if missing);
    # either way its sha256 must be the pinned one (evaluation/features.py), or it is refused, never loaded
    inception_weights: str = ""
    bpd_split: str = "test"  # held-out split for bits/dim ("" = skip)
    bpd_timesteps: int = 0  # 0 = exact sum over all T; K > 0 = unbiased estimate from K sampled t
    bpd_max_images: int = 1000  # images of that split used for bits/dim
    device: str = ""  # "" = cuda when available, else cpu
    feature_batch_size: int = 128  # images per feature-extractor call
    num_workers: int = 0  # processes resizing images for Inception (clean-fid's DataLoader; its default is 12)
    stats_cache_dir: str = ""  # reference statistics cache; "" = <data.shards>/fid_stats (or ~/.cache/ddpm-pipeline)
    reference_max_images: int = 0  # images of the reference split used (0 = all; part of the cache key)
    kid_subsets: int = 100  # KID: random subsets averaged (clean-fid's default)
    kid_subset_size: int = 1000  # KID: images per subset, at most (clean-fid's default)
    grid_images: int = 64  # images in the sample grid artifact
    confidence_threshold: float = 0.9  # digits classifier: share of samples labelled with at least this confidence

    def __post_init__(self) -> None:
        _positive("eval.num_samples", self.num_samples)
        _choice("eval.protocol", self.protocol, ("", "paper"))
        _choice("eval.sampler", self.sampler, ("ancestral", "ddim"))
        _choice("eval.spacing", self.spacing, ("uniform", "leading", "linspace", "trailing", "quadratic"))
        _positive("eval.steps", self.steps)
        _unit_interval("eval.eta", self.eta)
        _choice("eval.precision", self.precision, ("fp32", "bf16"))
        _positive("eval.batch_size", self.batch_size)
        _choice("eval.feature_extractor", self.feature_extractor, ("inception", "digits", "none"))
        _choice("eval.fid_mode", self.fid_mode, ("clean", "legacy_pytorch", "legacy_tensorflow"))
        _positive("eval.bpd_timesteps", self.bpd_timesteps, zero_ok=True)
        _positive("eval.bpd_max_images", self.bpd_max_images)
        if self.device and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"eval.device={self.device!r} must be '', 'cpu', 'cuda' or 'cuda:N'")
        _positive("eval.feature_batch_size", self.feature_batch_size)
        _positive("eval.num_workers", self.num_workers, zero_ok=True)
        _positive("eval.reference_max_images", self.reference_max_images, zero_ok=True)
        _positive("eval.kid_subsets", self.kid_subsets)
        if self.kid_subset_size < 2:
            raise ConfigError(f"eval.kid_subset_size={self.kid_subset_size} must be >= 2 (an unbiased MMD needs pairs)")
        _positive("eval.grid_images", self.grid_images)
        _unit_interval("eval.confidence_threshold", self.confidence_threshold)
        if not self.reference:
            raise ConfigError("eval.reference must be a split of data.shards (e.g. train) or clean-fid:<dataset>/<split>/<res>")
        if self.reference.startswith("clean-fid:") and self.feature_extractor == "digits":
            raise ConfigError(
                f"eval.reference={self.reference!r} is InceptionV3 statistics; it needs eval.feature_extractor=inception"
            )


@dataclass
class TrackingConfig:
    """MLflow tracking (pipeline/tracking/sink.py, docs/tracking.md). Rank 0 only; an outage never stops training."""

    enabled: bool = True  # false = log nothing (a null sink)
    # "" = $MLFLOW_TRACKING_URI, else sqlite:///<parent of train.out_dir>/mlflow.db: one embedded store (no server)
    # shared by a project's trainings (runs/mlflow.db for runs/a and runs/b), so compare sees them together
    uri: str = ""
    experiment: str = "ddpm"  # MLflow experiment name
    run_name: str = ""  # "" = the config's name
    retries: int = 3  # attempts per call before it is dropped with a warning
    retry_wait_s: float = 0.25  # first backoff between attempts (doubles each attempt)
    timeout_s: float = 10.0  # per HTTP request to a tracking server (MLflow takes whole seconds)
    queue_size: int = 1000  # calls held for the background sender; a call beyond this is dropped and counted
    start_timeout_s: float = 10.0  # make_sink waits at most this for the run to be created (0 = do not wait)
    flush_timeout_s: float = 30.0  # finish() waits at most this for queued calls to be sent
    probe_interval_s: float = 5.0  # during an outage, calls are dropped except one probe per this interval
    system_metrics: bool = False  # MLflow's system/* metrics (CPU, memory, disk, network, GPU) while training
    log_model: bool = True  # at the end, the final EMA weights as an MLflow pyfunc model of the run (docs/tracking.md)
    registered_model_name: str = ""  # and register that model under this name ("" = not registered)

    def __post_init__(self) -> None:
        _positive("tracking.retries", self.retries)
        _positive("tracking.retry_wait_s", self.retry_wait_s, zero_ok=True)
        _positive("tracking.timeout_s", self.timeout_s)
        _positive("tracking.queue_size", self.queue_size)
        _positive("tracking.start_timeout_s", self.start_timeout_s, zero_ok=True)
        _positive("tracking.flush_timeout_s", self.flush_timeout_s, zero_ok=True)
        _positive("tracking.probe_interval_s", self.probe_interval_s, zero_ok=True)
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty (an MLflow experiment name, e.g. ddpm)")
        if self.uri and "://" not in self.uri and not self.uri.startswith(("file:", "databricks")):
            raise ConfigError(
                f"tracking.uri={self.uri!r} has no scheme; write sqlite:///ABS/PATH/mlflow.db for a local store "
                "or http://HOST:PORT for a server (or leave it empty for the embedded default)"
            )


@dataclass
class Config:
    """A whole experiment."""

    name: str = "default"  # experiment name: the MLflow run name, and train.out_dir = runs/<name> when that is unset
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise ConfigError(
                f"name={self.name!r} must be a simple name (letters, digits, '.', '_', '-'; e.g. mine): it names the "
                "MLflow run and the default train.out_dir runs/<name>"
            )
        if not self.train.out_dir:
            self.train.out_dir = f"runs/{self.name}"


# Keys that moved out of train.* into their components' sections. Old configs still load: each old key is
# renamed with a warning that names the new one.
MOVED_KEYS = {
    **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "warmup_steps", "adam_beta1", "adam_beta2", "adam_eps",
                                               "weight_decay", "grad_clip")},
    "train.ema_decay": "ema.decay",
    "train.ema_warmup_steps": "ema.warmup_steps",
    "train.ema_update_every": "ema.update_every",
    "train.ema_power": "ema.power",
    "train.checkpoint_every_steps": "checkpoint.every_steps",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.resume": "checkpoint.resume",
    "train.log_every_steps": "logging.every_steps",
    "train.sample_every_steps": "logging.sample_every_steps",
    "train.sample_grid_images": "logging.sample_grid_images",
    "train.sample_ddim_steps": "logging.sample_ddim_steps",
    "train.preempt_check_every_steps": "preemption.check_every_steps",
}


def _move_renamed_keys(layer: Any, where: str) -> None:
    """Rename MOVED_KEYS in one YAML/override layer (in place), warning once per key."""
    for old, new in MOVED_KEYS.items():
        section, name = old.split(".")
        node = layer.get(section) if hasattr(layer, "get") else None
        if node is None or not hasattr(node, "keys") or name not in node:
            continue
        if OmegaConf.select(layer, new, default=None) is not None:
            raise ConfigError(f"{where} sets both {old} and {new}; {old} is the old name of {new}: keep only {new}")
        value = node[name]
        del node[name]
        OmegaConf.update(layer, new, value, force_add=True)
        warnings.warn(f"{old} (in {where}) is now {new}; the old name still works but will go: write {new}",
                      FutureWarning, stacklevel=3)


def _resolvers_in(value: str) -> list[str]:
    """The resolvers (``oc.env``, ``oc.decode``, any registered one) a string value would call when resolved,
    found in OmegaConf's own parse of it (nested ones too: ``${a.${oc.env:X}}``)."""
    try:
        stack = [parse_interpolation(value)]
    except GrammarParseError:
        return []  # not an interpolation OmegaConf can resolve: it says so itself when the config is resolved
    found = []
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            found.append(node.resolverName().getText())
        stack.extend(getattr(node, "children", None) or [])
    return found


def _refuse_resolvers(layer: Any, where: str) -> None:
    """ConfigError for a resolver anywhere in one YAML/override layer, before anything resolves it. Resolvers read
    the environment (``oc.env``) or build values (``oc.decode``), and what they return would be written into
    config.yaml, the checkpoint and MLflow; plain ``${other.key}`` references stay allowed."""
    stack = [("", OmegaConf.to_container(layer, resolve=False))]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str) and "${" in value and (names := _resolvers_in(value)):
            shown = value if len(value) <= 60 else value[:57] + "..."
            setting = key.split("[")[0]  # a list item is set with its list
            raise ConfigError(
                f"{where}: {key}={shown!r} calls the resolver {names[0]}, and resolvers are refused: their value "
                "(an environment variable's, a decoded one) would be written into config.yaml, the checkpoint and "
                f"MLflow. Write the value itself (in the file, or on the command line: {setting}=VALUE); secrets "
                "stay in the environment variables the pipeline reads itself (MLFLOW_TRACKING_URI, "
                "MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*), never in the config"
            )


def _wrap(exc: Exception, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).split("\n")[0]
    hint = f" (key {key!r})" if key else ""
    return ConfigError(f"invalid configuration in {where}{hint}: {msg}. Keys and types are listed in pipeline/config.py")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked and validated.

    Raises ConfigError naming the offending key for unknown keys, wrong types and invalid values.
    """
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/*.yaml")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # YAML syntax errors come from several libraries
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        _refuse_resolvers(layers[-1], str(path))
        _move_renamed_keys(layers[-1], str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. train.lr=1e-4); got {bad}")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as exc:  # OmegaConf's errors, and YAML's for a value that does not parse (key=[1,)
        raise _wrap(exc, "the command-line overrides") from exc
    _refuse_resolvers(layers[-1], "the overrides")
    _move_renamed_keys(layers[-1], "the overrides")
    merged = schema
    for layer, where in zip(layers, [str(path)] * (path is not None) + ["the overrides"]):
        try:  # one layer at a time, so that a wrong key or type is blamed on the file or the overrides that has it
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _wrap(exc, where) from exc
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required keys are not set: {', '.join(missing)} (set them in the YAML or as key=value)")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, "the configuration") from exc
    assert isinstance(cfg, Config)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (or sub-config) dataclass."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, cls: type = Config) -> Any:
    """Inverse of to_yaml (used to read the config saved beside a checkpoint)."""
    layer = OmegaConf.create(text)
    _refuse_resolvers(layer, "a saved config.yaml")
    if cls is Config:
        _move_renamed_keys(layer, "a saved config.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(cls), layer)
    return OmegaConf.to_object(merged)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 2e-4, "model.channel_mult": "[1, 2, 2, 2]", ...}`` for tracking params."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out
