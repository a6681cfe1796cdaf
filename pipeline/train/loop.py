"""The training loop: ``train(cfg)`` in paragraphs (after NVlabs/edm's training_loop.py), with what a
step needs behind small objects: ``OptimizerStep`` (the DDP/DeepSpeed difference), ``TickStats`` (the
device-side statistics of a log tick) and ``Preemption`` (SIGTERM/SIGUSR1). ``hooks`` (``LoopHooks``,
pipeline/train/hooks.py) let an observer in at fixed points; production passes none, the tests inject their
faults and traces through it (tests/helpers/faults.py).

``train(cfg, hooks=None) -> exit code``: 0 finished, 75 preempted (a checkpoint was written), raises otherwise
(launch/train.py maps ConfigError/CheckpointError to 2, anything else to 1).

Random streams (written down so that resume is bitwise and N ranks equal one rank):
- weights: ``torch.manual_seed(train.seed)`` before the U-Net is built, the same on every rank;
- t and noise of each sample: drawn for its position in the step's global batch (``StepNoise``: blocks of
  8 positions, each from a generator seeded with (train.seed, s, block)), so they depend on the sample's
  place in the global batch only, not on the number of processes, the micro batch or a restart;
- dropout of the micro-batch at place p of optimizer step s (p = accumulation step * world size + rank, its
  place in the step's global batch): torch's global RNG (the CPU's and the device's generator,
  ``seed_generators``) reseeded with SeedSequence([train.seed, s, p]): the same after a restart and for every
  layout with the same micro batch, but masks are drawn per micro-batch (another micro batch draws others);
- data order: the loader's global order (data.seed, epoch; pipeline.data.plan), the same for every layout;
  its position is saved as one record of all ranks' streams (``LoaderPosition``), which any layout resumes.

Host syncs and collectives: the loop never reads a device value except at a log tick (every
logging.every_steps), a sample grid or a checkpoint, and makes no collective of its own between ticks but
the preemption flags' (a host all-reduce over gloo started after a step and read after the next, never waited
for by a step: ``Preemption.step_end``; DDP's gradient buckets and DeepSpeed's own
collectives and overflow check aside: tests/test_step_sync.py; with optimizer.grad_clip_per, GroupClip's one
all-reduce of the clipped gradients per step takes the buckets' place). A non-finite gradient is detected on
the device (``applied`` below) and the optimizer step is skipped on the device (fused Adam's found_inf,
the AMP mechanism), the EMA update is masked with the same flag, and counters are read at the next tick.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.checkpoint import folder as ck
from pipeline.checkpoint.manager import CheckpointManager, make_deepspeed_loads_weights_only
from pipeline.checkpoint.weights import load_unet
from pipeline.config import Config, ConfigError, flatten, to_yaml
from pipeline.data.decode import unit_range
from pipeline.data.loader import StreamingLoader
from pipeline.data.report import DataError
from pipeline.data.sequential import iter_split
from pipeline.files import JSON_MAX_BYTES, read_json
from pipeline.geometry import resolve_geometry
from pipeline.model.diffusion import DDPMLoss, Diffusion
from pipeline.model.interop import IMPORTED
from pipeline.model.sampling import sample
from pipeline.model.unet import UNet
from pipeline.tracking.factory import make_sink
from pipeline.tracking.images import image_grid
from pipeline.tracking.logged_model import log_training_model
from pipeline.tracking.sink import describe_training_data, read_run_file, source_tags
from pipeline.train.ema import EMA, PartitionedEMA
from pipeline.train.flops import peak_tflops, precision_of, step_flops_per_image, utilisation
from pipeline.train.hooks import LoopHooks
from pipeline.train.preemption import PREEMPTED_EXIT_CODE, Preemption
from pipeline.train.step import (
    GroupClip,
    OptimizerStep,
    StepNoise,
    apply_numerics,
    batch_split,
    check_group_clip,
    configure_deepspeed,
    lr_at,
    micro_seed,
    resolve_precision,
    seed_generators,
)
from pipeline.train.ticks import TickStats, duration, tick_line


class NonFiniteLossError(RuntimeError):
    """Training stopped by train.nonfinite_policy."""



def git_commit() -> str:
    """HEAD of the checkout this code runs from ("" outside a git checkout): the run's source commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """Where training stands (the checkpoint's meta.json): steps, images, the MLflow run, finished."""

    def __init__(self) -> None:
        self.step, self.images_seen, self.finished = 0, 0, False
        self.mlflow_run_id: str | None = None
        self.mlflow_tracking_uri: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in vars(self):
            setattr(self, key, state.get(key))
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])


class LoaderPosition:
    """The loader's position in a checkpoint: one record of every rank's streams (data.json), so a job with
    another number of processes, micro batch or worker count continues the epoch exactly where it stopped
    (StreamingLoader.merge_states / load_state_dict). Checkpoints written before kept one file per rank
    (data/rank-<r>.json): those are read as they were (``per_rank_before``)."""

    per_rank_before = True

    def __init__(self, loader: StreamingLoader):
        self.loader, self._merged = loader, None

    def prepare_state_dict(self) -> None:
        """Collective: rank 0 gathers every rank's position."""
        states = dist.gather_object(self.loader.state_dict())
        self._merged = StreamingLoader.merge_states(states) if states is not None else None

    def state_dict(self) -> dict[str, Any]:
        merged, self._merged = self._merged, None
        if merged is None:
            raise RuntimeError("LoaderPosition.state_dict() needs prepare_state_dict() on every rank first")
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


# --------------------------------------------------------------------------------------------- train


def make_accelerator(tc: Any) -> tuple[Any, bool]:
    """(Accelerator, under DeepSpeed?). Refuses what cannot run before any process group exists."""
    # accelerate: ~2 s cold; only training needs it (evaluation and export read checkpoints without it)
    from accelerate import Accelerator
    from accelerate.utils import (
        DDPCommunicationHookType,
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
    )

    on_gpu = torch.cuda.is_available()
    if tc.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast and loss scaling are "
                          "GPU-only); on CPU use train.mixed_precision=bf16 or no")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    # gloo on CPU: DeepSpeed otherwise believes every rank is alone (docs/deepspeed.md).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a launcher started several processes
    timeout = timedelta(seconds=tc.dist_timeout_s)  # every backend: NCCL's default (10 min) is not ours to rely on
    handlers: list[Any] = [InitProcessGroupKwargs(backend="gloo", timeout=timeout) if launched and not on_gpu
                           else InitProcessGroupKwargs(timeout=timeout)]
    # DDP: gradients are views into the all-reduce buckets (no second gradient-sized buffer and copy); the
    # reduction optionally in bf16 (DeepSpeed: communication_data_type, set in configure_deepspeed).
    # static_graph stays off: the accumulation steps skip the all-reduce (no_sync), which it does not promise.
    handlers.append(DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if tc.grad_comm_dtype == "bf16" else DDPCommunicationHookType.NO,
    ))
    # Several processes on CPU: cpu=True makes Accelerate's state MULTI_CPU whatever launched them. Without it,
    # a launch from a config file (use_cpu: true) without ACCELERATE_USE_CPU in the environment gave a process
    # group but distributed_type NO: no DDP wrapper (no gradient all-reduce) and no-op barriers.
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, kwargs_handlers=handlers,
                              cpu=launched and not on_gpu and not deepspeed)
    if launched and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"the launcher started {os.environ.get('WORLD_SIZE')} processes but Accelerate set up no "
                          "distributed run (distributed_type NO); launch with accelerate launch --multi_gpu, or "
                          "set ACCELERATE_USE_CPU=1 on a CPU machine")
    dist.init_flag_group(timeout)
    apply_numerics(tc)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return accelerator, deepspeed


def start_tracking(cfg: Config, accelerator: Any, progress: Progress, resumed: bool) -> Any:
    """The tracking sink (a null sink off rank 0), with the resolved config as params and as a file.

    One run per training: a resume continues the checkpoint's run, or, when the checkpoint was saved before
    its run existed (run id null), the run that out_dir/mlflow_run.json names. A run named there that this
    job does not continue was left RUNNING by a job that died: the sink marks it KILLED.
    """

    logs = accelerator.is_main_process and cfg.tracking.enabled
    recorded = read_run_file(cfg.train.out_dir) if accelerator.is_main_process else None
    run_id = progress.mlflow_run_id or (recorded["run_id"] if recorded and resumed else None)
    sink = make_sink(cfg.tracking, out_dir=cfg.train.out_dir, is_main_process=accelerator.is_main_process,
                     run_id=run_id, run_name=cfg.tracking.run_name or cfg.name,
                     tags=source_tags(git_commit()) if logs else None,  # MLflow's mlflow.source.* / mlflow.user
                     supersedes=recorded["run_id"] if recorded and recorded["run_id"] != run_id else None)
    progress.mlflow_tracking_uri = getattr(sink, "tracking_uri", None)
    if logs:
        sink.log_params(flatten(cfg) | {"world_size": accelerator.num_processes,
                                        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
        sink.log_artifact(text=to_yaml(cfg), name="config.yaml")
        try:  # the loader has read the same manifest already; a failure here only costs the dataset input
            sink.log_dataset(describe_training_data(cfg.data), context="training")
        except Exception as exc:

            logging.getLogger("pipeline.tracking.sink").warning("tracking: the training data is not logged as a "
                                                           "dataset input: %s", exc)
    return sink


def uses_loss_scaling(accelerator: Any, tc: Any, deepspeed: bool) -> bool:
    """fp16 (GPU only): Accelerate's GradScaler, or DeepSpeed's dynamic loss scaler, skips a step whose scaled
    gradient overflowed and lowers the scale; with a finite loss that is the scaler at work, not a fault."""
    if tc.mixed_precision == "fp16":
        return True
    return deepspeed and str(accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled")
                             ).lower() == "true"


def nonfinite_stop(tc: Any, metrics: dict[str, float], longest: int, tick_steps: int, step: int) -> str:
    """Why train.nonfinite_policy stops the run after this tick ("" = go on)."""
    nonfinite = int(metrics["train/nonfinite_steps"])
    if not nonfinite or (tc.nonfinite_policy == "skip" and longest < tc.max_nonfinite_in_row):
        return ""
    why = ("train.nonfinite_policy=stop" if tc.nonfinite_policy == "stop" else
           f"{longest} in a row >= train.max_nonfinite_in_row={tc.max_nonfinite_in_row}")
    return (f"non-finite loss/gradient in {nonfinite} of the last {tick_steps} steps (ending at step {step}; "
            f"{why}); those steps were skipped, the weights and EMA are untouched: lower optimizer.lr, check the "
            "data, or use bf16/no.")


def already_finished(step: int, total_steps: int, checkpoint: Path) -> str:
    return (f"already finished at step {step} (train.total_steps={total_steps}; final checkpoint {checkpoint}): "
            "nothing to do. Raise train.total_steps to train on, or set name=NEW (or train.out_dir) for a new run")


def closing_summary(cfg: Config, *, steps: int, first_step: int, seconds: float, final: Path | None,
                    exit_code: int) -> str:
    """What the run did and what to do next (printed by rank 0 at the end)."""
    trained = steps - first_step
    rate = trained * cfg.train.batch_size / seconds if seconds > 0 else 0.0
    how = "finished" if exit_code == 0 else f"stopped (exit {exit_code}: requeue to resume)"
    lines = [f"{how}: {trained} steps this job (step {first_step} -> {steps} of {cfg.train.total_steps}) in "
             f"{duration(seconds)}, {rate:.1f} img/s overall"]
    if final is not None:
        lines.append(f"newest checkpoint: {final}")
        if exit_code == 0:
            lines.append(f"evaluate it: python -m evaluation.evaluate --checkpoint {final}")
    return "\n".join(lines)


def log_sample_grid(ema_net: torch.nn.Module, diffusion: Any, lg: Any, sink: Any, step: int) -> None:
    """A DDIM grid from the EMA into tracking (rank 0; a few seconds on the demo)."""

    device = next(ema_net.parameters()).device
    images = sample(ema_net, diffusion, range(lg.sample_grid_images), sampler="ddim", steps=lg.sample_ddim_steps,
                    batch_size=lg.sample_grid_images, device=device)
    sink.log_image(image_grid(images, min_width=256), key="samples/ema", step=step)


def log_real_grid(cfg: Config, sink: Any) -> None:
    """Real images of the training split, as many as the sample grids show, once per job ("samples/real"),
    so that the grids of samples are judged beside the data (rank 0; reads a few images)."""
    try:
        images = [s.image for s in iter_split(cfg.data.shards, cfg.data.split, cfg.logging.sample_grid_images)]
    except DataError as exc:  # the loader reports the data's problems; the grid is only a picture
        print(f"warning: no real-image grid: {exc}", flush=True)
        return
    if images:
        sink.log_image(image_grid(np.stack(images), min_width=256), key="samples/real", step=0)


def init_from(net: torch.nn.Module, cfg: Config, accelerator: Any) -> None:
    """train.init_from: load that checkpoint's EMA weights into ``net`` (every rank, before the EMA copies it).

    A step folder, a run folder (its newest checkpoint whose EMA file matches its sha256) or an imported checkpoint
    (python -m evaluation.export --from-diffusers); its model config must be cfg.model's (model.dropout aside: it
    changes training, not what the weights mean). Skipped with a note when this run resumes from its own
    checkpoint; a resume of an imported checkpoint (no optimizer, data or RNG state) is refused.
    """
    resume = cfg.checkpoint.resume
    own = ck.complete_checkpoints(cfg.train.out_dir) if resume == "auto" else [] if resume == "none" else [Path(resume)]
    if own:
        try:
            meta = read_json(own[-1] / "meta.json", max_bytes=JSON_MAX_BYTES, what="meta.json")
        except (OSError, ValueError):
            meta = {}  # the resume says what is wrong with it
        if IMPORTED in meta:
            raise ck.CheckpointError(f"{own[-1]} is an imported checkpoint (weights only: no optimizer, data or RNG "
                                     "state) and cannot be resumed: start a new run (another train.out_dir) from it "
                                     f"with train.init_from={own[-1]}")
        if cfg.train.init_from:
            accelerator.print(f"train.init_from={cfg.train.init_from} ignored: resuming from this run's own checkpoint")
        return
    if not cfg.train.init_from:
        return
    where = Path(cfg.train.init_from)
    found = [where] if (where / ck.COMPLETE).exists() else list(reversed(ck.complete_checkpoints(where)))
    intact = [p for p in found if not ck.Checkpoint(p, what="train.init_from").verify([ck.EMA_FILE])]
    if not intact:
        raise ck.CheckpointError(f"train.init_from={where}: no complete checkpoint with an intact {ck.EMA_FILE} "
                                 "there; give a step-NNNNNNNN folder, a run folder holding one, or an imported checkpoint")
    try:
        loaded = load_unet(intact[0], "ema", expect=cfg.model)
    except ck.CheckpointError as exc:
        raise ck.CheckpointError(f"train.init_from: {exc}") from None
    net.load_state_dict(loaded.net.state_dict())
    accelerator.print(f"initialised the U-Net from the EMA weights of {intact[0]} (step {loaded.step}): new "
                      "optimizer, step 0")


def train(cfg: Config, hooks: LoopHooks | None = None) -> int:


    # Set-up: the geometry from the data (refusing a mismatch before anything is created), the accelerator
    # (refusing what cannot run), the batch split, the hooks.
    cfg = resolve_geometry(cfg)
    cfg, precision_line = resolve_precision(cfg)  # train.mixed_precision=auto: what this machine runs natively
    tc, oc = cfg.train, cfg.optimizer
    started = time.perf_counter()
    accelerator, deepspeed = make_accelerator(tc)
    if precision_line:
        accelerator.print(precision_line)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if oc.grad_clip_per:
        check_group_clip(cfg, deepspeed, world)
    micro, accum = batch_split(tc.batch_size, oc.grad_clip_per or tc.micro_batch_per_gpu, world)
    # With per-group clipping each micro-batch's gradient is taken whole (its loss not divided by accum): GroupClip
    # averages the clipped groups itself.
    accelerator.gradient_accumulation_steps = 1 if oc.grad_clip_per else accum
    hooks = LoopHooks() if hooks is None else hooks
    hooks.start(rank=rank, device=device, deepspeed=deepspeed)

    # Model, loss, EMA, optimizer. The same seed on every rank gives the same initial weights (DDP would
    # broadcast them anyway; DeepSpeed does not). The EMA averages fp32 weights: under DDP an fp32 copy of
    # the live U-Net; under DeepSpeed (bf16 module, ZeRO partitions) each rank's slice of the optimizer's
    # fp32 master weights, so it is made once DeepSpeed has partitioned them (pipeline/train/ema.py).
    torch.manual_seed(tc.seed)
    net = UNet(cfg.model)
    init_from(net, cfg, accelerator)  # train.init_from, before the EMA copies the weights
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    diffusion = Diffusion(cfg.diffusion)
    ema: EMA | PartitionedEMA | None = None
    # all EMAs (ema.decay, ema.decays, ema.posthoc.sigma_rels) in one bank; snapshots at the checkpoint cadence
    # unless ema.posthoc.snapshot_every_steps says otherwise
    snapshot_every = cfg.ema.posthoc.snapshot_every_steps or cfg.checkpoint.every_steps
    if not deepspeed:
        net.to(device)
        ema = EMA(net, cfg.ema, device=device, snapshot_every=snapshot_every)
    if tc.compile:
        net.compile()  # in place: state_dict keys stay those of the plain U-Net
    adam = torch.optim.Adam(net.parameters(), lr=lr_at(0, oc.lr, oc.warmup_steps, oc.warmup_from_zero), betas=(oc.adam_beta1, oc.adam_beta2),
                            eps=oc.adam_eps, weight_decay=oc.weight_decay, fused=not deepspeed)
    if deepspeed:
        configure_deepspeed(accelerator, cfg, micro, accum)
    loss_module, wrapped_adam = accelerator.prepare(DDPMLoss(net, diffusion), adam)
    if deepspeed:
        make_deepspeed_loads_weights_only(loss_module)
        ema = PartitionedEMA(loss_module, net, cfg.ema, build=lambda: UNet(cfg.model), device=device,
                             snapshot_every=snapshot_every)
    group_clip = GroupClip(accelerator, loss_module, oc.grad_clip, accum * world) if oc.grad_clip_per else None
    optimizer_step = OptimizerStep(accelerator, loss_module, adam, wrapped_adam, oc.grad_clip, deepspeed, group_clip)
    autocast_bf16 = deepspeed and tc.mixed_precision == "bf16"  # DeepSpeed does not autocast for us
    # The input path as EDM's: uint8 batches (a quarter of float32's bytes), page-locked where CUDA is present so
    # that the non_blocking copy below is an asynchronous DMA, scaled to [-1, 1] on the device (bit for bit the
    # loader's float32 scaling: on CPU the training is what it was)
    loader = StreamingLoader(cfg.data, batch_size=micro, rank=rank, world_size=world, uint8=True,
                             pin_memory=device.type == "cuda")

    # Checkpoints and resume: every piece of state is one entry in the registry.
    progress = Progress()
    checkpoints = CheckpointManager(tc.out_dir, cfg.checkpoint, accelerator=accelerator, record=cfg,
                                    parts={"meta": progress, **ema.parts(), "data": LoaderPosition(loader)},
                                    weights_finite=ema.all_finite)
    checkpoints.start()
    resumed_from = checkpoints.resume()
    if resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} at step {progress.step}")
        if progress.step >= tc.total_steps:  # nothing to train: no MLflow run, no loader, no new checkpoint
            accelerator.print(already_finished(progress.step, tc.total_steps, resumed_from))
            checkpoints.mark_done(progress.step)
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return 0

    # Tracking (rank 0; the sink never raises nor waits on the network), into the resumed run if any.
    sink = start_tracking(cfg, accelerator, progress, resumed=resumed_from is not None)
    if cfg.logging.sample_every_steps and accelerator.is_main_process and resumed_from is None:
        log_real_grid(cfg, sink)
    tick = TickStats(device, diffusion.num_timesteps, uses_loss_scaling(accelerator, tc, deepspeed))
    step_noise = StepNoise(tc.seed, diffusion.num_timesteps, device)
    # Utilisation: the step's FLOPs per image, counted once on rank 0 (shapes only, on the meta device; the tick's
    # metrics are logged and printed there only), and the peak
    flops_per_image = step_flops_per_image(cfg) if accelerator.is_main_process else 0.0
    peak = tc.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device), precision_of(tc))
                              if device.type == "cuda" else None)
    accelerator.print(f"utilisation: {flops_per_image / 1e9:.3g} GFLOP per image and step (forward + backward)"
                      + (f", peak {peak:g} TFLOP/s per device ({precision_of(tc)})" if peak else
                         (", MFU: no peak known for this GPU (set train.peak_tflops)" if device.type == "cuda" else "")))
    preemption = Preemption(cfg.preemption.check_every_steps)
    data_iter, exit_code, first_step = iter(loader), 0, progress.step
    accelerator.print(f"training: world {world}, micro batch {micro}, accumulation {accum}, "
                      + (f"each micro-batch's gradient clipped to {oc.grad_clip} (optimizer.grad_clip_per), "
                         if group_clip else "") + "from step "
                      f"{progress.step} to {tc.total_steps}"
                      + (f" (collectives time out after {timeout_s:.0f} s)" if (timeout_s := dist.timeout_s()) else ""))

    loss_module.train()  # once: nothing in the loop sets eval mode (sample grids run on the EMA network)
    while progress.step < tc.total_steps:
        step = progress.step
        hooks.step_begin(step, first_step)
        # Data: one micro-batch per accumulation step. The only wait on the loader is here.
        t0 = time.perf_counter()
        batches = [next(data_iter) for _ in range(accum)]
        data_wait_s = time.perf_counter() - t0

        # Forward and backward. accelerator.accumulate skips the DDP all-reduce (and DeepSpeed's step)
        # on all but the last micro-batch and divides the loss by the accumulation count. With per-group
        # clipping no backward all-reduces (no_sync): each group's gradient is clipped into GroupClip's sum.
        loss_q = count_q = torch.zeros(4, device=device)
        for i, batch in enumerate(batches):
            m, x = rank * accum + i, batch["image"]
            hooks.samples(step, m, batch["index"])
            place = i * world + rank  # the micro-batch's place in the step's global batch (pipeline.data.plan)
            seed_generators(micro_seed(tc.seed, step, place), device)  # dropout: per micro-batch place
            t_i, noise_i = step_noise.draw(step, place * micro, tuple(x.shape))  # t and noise: per sample position
            x = unit_range(x.to(device, non_blocking=True))
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = hooks.batch(x, step, m, first_of_rank=i == 0)
            sync = accelerator.accumulate(loss_module) if group_clip is None else accelerator.no_sync(loss_module)
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16):
                loss_ps, t = loss_module(x, t_i, noise_i)
                loss_ps = loss_ps.float()
                accelerator.backward(loss_ps.mean())
            if group_clip is not None:
                group_clip.add()
            lq, cq = tick.quartiles(loss_ps, t)
            loss_q, count_q = loss_q + lq, count_q + cq

        # Optimizer step, skipped on the device when the gradient is not finite; the EMA from fp32
        # weights, masked by the same flag so a skipped step leaves it unchanged.
        lr = lr_at(step, oc.lr, oc.warmup_steps, oc.warmup_from_zero)
        applied, grad_norm = optimizer_step.step(lr)
        tick.add(loss_q, count_q, applied, grad_norm, data_wait_s)
        ema.update(applied.float())
        progress.step, progress.images_seen = step + 1, progress.images_seen + tc.batch_size
        step, done = progress.step, progress.step >= tc.total_steps
        hooks.step_end(step, first_step, ema)  # what follows (ticks, grids, checkpoints) may sync

        # Log tick: the one place the host waits for the device.
        if step % cfg.logging.every_steps == 0 or done:
            tick_steps = tick.steps
            metrics, longest_nonfinite = tick.flush(accelerator, lr, tc.batch_size)
            metrics |= utilisation(flops_per_image, metrics["train/images_per_s"], world, peak)
            sink.log_metrics(metrics, step=step)
            accelerator.print(tick_line(step, tc.total_steps, metrics, time.perf_counter() - started))
            stop_why = nonfinite_stop(tc, metrics, longest_nonfinite, tick_steps, step)
            if stop_why:
                sink.finish("FAILED")
                raise NonFiniteLossError(f"{stop_why} {checkpoints.newest_intact_note()}")

        # Sample grid from the EMA (on rank 0; under DeepSpeed every rank takes part in gathering it).
        every = cfg.logging.sample_every_steps
        if every and (step % every == 0 or done):
            ema_net = ema.gathered_model()
            if accelerator.is_main_process:
                log_sample_grid(ema_net, diffusion, cfg.logging, sink, step)
            del ema_net

        # Preemption (the ranks' flags, exchanged without waiting, read one step later) and checkpoint: every rank
        # takes part in both.
        preempted = preemption.step_end(step, done)
        if checkpoints.due(step, final=done or preempted) or ema.snapshot_due(step):  # snapshots: in a checkpoint
            # the run's id, once it exists: a checkpoint saved while a slow store is still creating it waits
            progress.finished = done
            progress.mlflow_run_id = sink.settled_run_id(cfg.tracking.flush_timeout_s)
            saving = time.perf_counter()
            saved = checkpoints.save(step)
            accelerator.print(f"checkpoint {saved} written in {time.perf_counter() - saving:.1f} s")
        hooks.after_checkpoint(step, done)
        if preempted and not done:
            accelerator.print(f"preempted (signal {preemption.received[:1]}): checkpoint at step {step}, "
                              f"exiting with {PREEMPTED_EXIT_CODE}")
            exit_code = PREEMPTED_EXIT_CODE
            preemption.ignore_further()
            break

    # The end: the hooks' close (the tests' digests), TRAINING_DONE, the run's status.
    hooks.close(ema)
    if exit_code == 0:
        checkpoints.mark_done(progress.step)
    if loader.stats.get("skipped_samples") or loader.stats.get("skipped_shards"):
        accelerator.print(f"data: skipped {loader.stats}")
    sink.finish("FINISHED" if exit_code == 0 else "KILLED")
    newest = checkpoints.complete()
    accelerator.print(closing_summary(cfg, steps=progress.step, first_step=first_step,
                                      seconds=time.perf_counter() - started, final=newest[-1] if newest else None,
                                      exit_code=exit_code))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if exit_code == 0 and newest and accelerator.is_main_process and cfg.tracking.enabled and cfg.tracking.log_model:
        # The final EMA weights as an MLflow model of the run (docs/tracking.md); never fails the training.
        log_training_model(newest[-1], cfg.tracking, sink.run_id, sink.tracking_uri)
    return exit_code
