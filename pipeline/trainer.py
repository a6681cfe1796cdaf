"""The training loop: one function, in paragraphs (after NVlabs/edm's training_loop.py).

``train(cfg) -> exit code``: 0 finished, 75 preempted (a checkpoint was written), raises otherwise
(launch/train.py maps ConfigError/CheckpointError to 2, anything else to 1).

Random streams (written down so that resume is bitwise and N ranks equal one rank):
- weights: ``torch.manual_seed(train.seed)`` before the U-Net is built, the same on every rank;
- t, noise and dropout of micro-batch m of optimizer step s: torch's global RNG reseeded with
  SeedSequence([train.seed, s, m]), where m = rank * accumulation + i counts micro-batches across
  ranks. The random numbers therefore depend on the position in the global batch only, not on the
  number of processes or on a restart;
- data order: the loader's own (data.seed, epoch), with its position saved per rank.

Host syncs: the loop never reads a device value except at a log tick (every train.log_every_steps),
a sample grid or a checkpoint. A non-finite gradient is detected on the device (``ok`` below) and
the optimizer step is skipped on the device (fused Adam's found_inf, the AMP mechanism), the EMA
update is masked with the same flag, and counters are read at the next tick.

Test-only knobs (environment variables, read once at start; documented in docs/training.md):
  DDPM_FAULT_NAN_AT_STEP=3,4   make the loss of those optimizer steps (1-based) NaN on rank 0
  DDPM_TRACE_BATCHES_DIR=DIR   append "step micro sha1" of every consumed batch to DIR/rank-<r>.txt, and at
                               the end "params sha1" / "ema sha1" of this rank's final weights
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, dist
from pipeline.config import Config, ConfigError, flatten, to_yaml

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written, requeue the job and it resumes


class NonFiniteLossError(RuntimeError):
    """Training stopped by train.nonfinite_policy."""


def classify_skip(ok: torch.Tensor, loss_sum: torch.Tensor, loss_scaling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-finite, loss-scaler skip) as 0/1 float tensors for one optimizer step, on the device (no sync).

    ``ok``: the step was applied. A skipped step is a loss-scaler skip when fp16 loss scaling is on and the
    loss was finite (the scaled gradient overflowed; the scaler lowers its scale and goes on); any other
    skipped step is non-finite and counts towards train.nonfinite_policy / max_nonfinite_in_row.
    """
    skipped = ~ok
    scaler_skip = skipped & torch.isfinite(loss_sum) if loss_scaling else torch.zeros_like(skipped)
    return (skipped & ~scaler_skip).float(), scaler_skip.float()


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """The paper's schedule: linear warm-up over warmup_steps, then constant. ``step`` = steps done."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the global RNG for micro-batch ``micro`` (counted across ranks) of optimizer step ``step``."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0])


def batch_split(batch_size: int, micro_batch_per_gpu: int, world_size: int) -> tuple[int, int]:
    """(micro batch per device, accumulation steps) for a global batch; raises ConfigError if indivisible."""
    micro = micro_batch_per_gpu or batch_size // world_size
    if micro == 0 or batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split over {world_size} processes with "
            f"train.micro_batch_per_gpu={micro_batch_per_gpu or 'auto'}: it must equal "
            f"micro_batch_per_gpu x {world_size} x accumulation steps; choose a batch size divisible by "
            f"{world_size * (micro_batch_per_gpu or 1)} or another micro_batch_per_gpu"
        )
    return micro, batch_size // (micro * world_size)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _fault_steps() -> set[int]:
    raw = os.environ.get("DDPM_FAULT_NAN_AT_STEP", "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError as exc:
        raise ConfigError(f"DDPM_FAULT_NAN_AT_STEP={raw!r}: expected comma-separated step numbers") from exc


def train(cfg: Config) -> int:
    tc = cfg.train
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from pipeline.data.stream import StreamingLoader
    from pipeline.diffusion import DDPMLoss, Diffusion
    from pipeline.ema import EMA, refresh_source_from_deepspeed
    from pipeline.sampling import sample
    from pipeline.tracking import image_grid, make_sink
    from pipeline.unet import UNet

    # Refuse what cannot run before any process group exists, so the message is the first thing seen.
    on_gpu = torch.cuda.is_available()
    if tc.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast and loss scaling are GPU-only); "
            "on CPU use train.mixed_precision=bf16 or no"
        )
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")

    # Accelerator. gloo on CPU: DeepSpeed otherwise believes every rank is alone (STACK_NOTES).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a launcher started several processes
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not on_gpu else []
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, kwargs_handlers=handlers)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    dist.init_flag_group()
    micro, accum = batch_split(tc.batch_size, tc.micro_batch_per_gpu, world)
    accelerator.gradient_accumulation_steps = accum
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    fault_steps = _fault_steps()
    # Test hook: stall (as a hung job would) once step N's checkpoint is written, so a test can SIGKILL the
    # run at a known step however fast the steps are.
    stall_after = int(os.environ.get("DDPM_FAULT_STALL_AFTER_STEP", "0") or 0)
    trace_dir = os.environ.get("DDPM_TRACE_BATCHES_DIR", "")
    # Test hook (tests/test_gpu.py): make any host-device sync inside a training step an error, from the
    # third step on (the first ones initialise CUDA, cuDNN and the allocator), DDP/1-GPU path only.
    sync_check = on_gpu and not use_deepspeed and os.environ.get("DDPM_CUDA_SYNC_CHECK", "") == "1"
    out_dir = Path(tc.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_tmp(out_dir)
    accelerator.wait_for_everyone()

    # Model, loss, EMA. The same seed on every rank gives the same initial weights (DDP would
    # broadcast them anyway; DeepSpeed does not).
    torch.manual_seed(tc.seed)
    net = UNet(cfg.model)
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    diffusion = Diffusion(cfg.diffusion)
    # Under DeepSpeed the module may become bf16 or ZeRO-3 partitions: the EMA reads an fp32 copy
    # refreshed from DeepSpeed's master weights; elsewhere it reads the live fp32 U-Net.
    ema_source = copy.deepcopy(net) if use_deepspeed else net
    ema = EMA(ema_source, decay=tc.ema_decay, warmup_steps=tc.ema_warmup_steps,
              update_every=tc.ema_update_every, power=tc.ema_power)
    ema.model.to(device)
    ema_source.to(device)
    if tc.compile:
        net.compile()  # in place: state_dict keys stay those of the plain U-Net
    loss_fn = DDPMLoss(net, diffusion)
    # fused Adam takes found_inf: a non-finite step is skipped on the device, step count included.
    adam = torch.optim.Adam(net.parameters(), lr=lr_at(0, tc.lr, tc.warmup_steps),
                            betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=not use_deepspeed)

    # DeepSpeed reads batch sizes and clipping from its config; we own them (global batch semantics).
    if use_deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = tc.batch_size
        ds["gradient_clipping"] = tc.grad_clip
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        # Under DeepSpeed, a non-finite step is skipped by the engine's own check; these settings turn it
        # off (ZeRO-1/2), and the NaN would reach the weights and the EMA unnoticed.
        disabled = [key for key, value in (("bf16.check_grad_overflow", ds.get("bf16", {}).get("check_grad_overflow")),
                                           ("zero_optimization.compute_grad_norm",
                                            ds["zero_optimization"].get("compute_grad_norm")))
                    if str(value).lower() == "false"]
        if disabled:
            raise ConfigError(
                f"the DeepSpeed config sets {' and '.join(disabled)} to false: DeepSpeed would then apply steps with "
                "non-finite gradients, which train.nonfinite_policy relies on it to skip; remove "
                "those keys (both default to true)"
            )
    model, optimizer = accelerator.prepare(loss_fn, adam)
    ds_engine = model if use_deepspeed else None
    autocast_bf16 = use_deepspeed and tc.mixed_precision == "bf16"  # DeepSpeed does not autocast for us

    loader = StreamingLoader(cfg.data, batch_size=micro, rank=rank, world_size=world)

    # Resume: rank 0 picks the folder (auto = newest complete one) and tells the others.
    resume_path = None
    if accelerator.is_main_process:
        resume_path = checkpoint.resolve_resume(out_dir, tc.resume)
    resume_path = dist.broadcast_object(resume_path)
    step, images_seen, run_id = 0, 0, None
    if resume_path is not None:
        loaded = checkpoint.load(accelerator, Path(resume_path), cfg)
        ema.load({k: v.to(device) for k, v in loaded.ema_weights.items()}, loaded.ema_counters)
        loader.load_state_dict(loaded.loader_state)
        step, images_seen = int(loaded.meta["step"]), int(loaded.meta["images_seen"])
        run_id = loaded.meta.get("mlflow_run_id")
        accelerator.print(f"resumed from {resume_path} at step {step}")

    # Tracking (rank 0; the sink never raises nor waits on the network).
    sink = make_sink(cfg.tracking, out_dir=tc.out_dir, is_main_process=accelerator.is_main_process,
                     run_id=run_id, run_name=cfg.tracking.run_name or cfg.name)
    if accelerator.is_main_process:
        sink.log_params(flatten(cfg) | {"git_commit": _git_commit(), "world_size": world,
                                        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
        sink.log_artifact(text=to_yaml(cfg), name="config.yaml")

    # Preemption: the handler only sets a flag; ranks agree on it every preempt_check_every_steps.
    stop_signal: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def save(finished: bool) -> Path:
        return checkpoint.save(
            accelerator, cfg, step=step,
            meta={"images_seen": images_seen, "epoch": loader.epoch, "mlflow_run_id": sink.run_id,
                  "mlflow_tracking_uri": getattr(sink, "tracking_uri", None), "finished": finished},
            ema_weights=ema.weights(), ema_counters=ema.state_dict(), loader_state=loader.state_dict(),
        )

    # Device-side accumulators, read only at ticks.
    T = diffusion.num_timesteps
    zero = torch.zeros((), device=device)
    tick = {"loss_q": torch.zeros(4, device=device), "count_q": torch.zeros(4, device=device),
            "grad_norm": zero.clone(), "ok_steps": zero.clone(), "bad_steps": zero.clone(),
            "scaler_skips": zero.clone()}
    # fp16 (GPU only): Accelerate's GradScaler, or DeepSpeed's dynamic loss scaler, skips a step whose scaled
    # gradient overflowed and lowers the scale; with a finite loss that is the scaler at work, not a fault.
    loss_scaling = tc.mixed_precision == "fp16" or (
        use_deepspeed and str(accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled")).lower()
        == "true")
    bad_run = zero.clone()  # non-finite steps in a row, now
    bad_run_max = zero.clone()  # the longest such run since the last tick
    tick_start, tick_steps, data_wait_s = time.perf_counter(), 0, 0.0
    ds_skipped = ds_engine.skipped_steps if ds_engine is not None else 0
    data_iter = iter(loader)
    exit_code = 0
    trace = open(Path(trace_dir) / f"rank-{rank}.txt", "a", buffering=1) if trace_dir else None  # noqa: SIM115
    accelerator.print(f"training: world {world}, micro batch {micro}, accumulation {accum}, from step {step} "
                      f"to {tc.total_steps}")

    first_step = step
    while step < tc.total_steps:
        if sync_check and step >= first_step + 2:
            torch.cuda.set_sync_debug_mode("error")
        # Data: one micro-batch per accumulation step. The only wait on the loader is here.
        t0 = time.perf_counter()
        batches = [next(data_iter)["image"] for _ in range(accum)]
        data_wait_s += time.perf_counter() - t0

        # Forward and backward. accelerator.accumulate skips the DDP all-reduce (and DeepSpeed's step)
        # on all but the last micro-batch and divides the loss by the accumulation count.
        model.train()
        step_loss_q, step_count_q = torch.zeros(4, device=device), torch.zeros(4, device=device)
        for i, x in enumerate(batches):
            m = rank * accum + i
            torch.manual_seed(micro_seed(tc.seed, step, m))
            x = x.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if trace is not None:
                trace.write(f"{step} {m} {hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()}\n")
            if step + 1 in fault_steps and rank == 0 and i == 0:
                x = x * float("nan")
            with accelerator.accumulate(model), torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16):
                loss_ps, t = model(x)
                loss_ps = loss_ps.float()
                accelerator.backward(loss_ps.mean())
            q = (t * 4 // T).clamp(max=3)
            step_loss_q.index_add_(0, q, loss_ps.detach())
            step_count_q.index_add_(0, q, torch.ones_like(loss_ps))

        # Optimizer step, skipped on the device when the gradient is not finite. The gradient norm is
        # taken after the DDP all-reduce, so `ok` is the same on every rank.
        lr = lr_at(step, tc.lr, tc.warmup_steps)
        for group in adam.param_groups:
            group["lr"] = lr
        if ds_engine is None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            ok = torch.isfinite(grad_norm)
            adam.found_inf = (~ok).float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            # DeepSpeed stepped inside backward() and skips non-finite steps itself (it syncs to decide);
            # its skipped_steps counter tells us, at no extra cost.
            applied = ds_engine.skipped_steps == ds_skipped
            ds_skipped = ds_engine.skipped_steps
            ok = torch.tensor(applied, device=device)
            grad_norm = torch.as_tensor(float(ds_engine.get_global_grad_norm() or 0.0) if applied else 0.0,
                                        device=device)
        okf = ok.float()
        # Skipped steps: non-finite (held against train.nonfinite_policy) unless the loss scaler skipped a
        # step whose loss was finite. A skipped step's loss stays out of the logged curve, as its update
        # stays out of the weights.
        badf, scaler_skip = classify_skip(ok, step_loss_q.sum(), loss_scaling)
        tick["loss_q"] += torch.where(ok, step_loss_q, zero)
        tick["count_q"] += torch.where(ok, step_count_q, zero)
        tick["grad_norm"] += torch.where(ok, grad_norm.float(), zero)
        tick["ok_steps"] += okf
        tick["bad_steps"] += badf
        tick["scaler_skips"] += scaler_skip
        bad_run = (bad_run + 1) * badf
        bad_run_max = torch.maximum(bad_run_max, bad_run)

        # EMA from fp32 weights, masked by `ok` so a skipped step leaves it unchanged.
        if ds_engine is not None:
            refresh_source_from_deepspeed(ema_source, ds_engine.module.net)
        ema.update(okf)
        step += 1
        images_seen += tc.batch_size
        tick_steps += 1
        done = step >= tc.total_steps
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")  # what follows (ticks, grids, checkpoints) may sync

        # Log tick: the one place the host waits for the device.
        if step % tc.log_every_steps == 0 or done:
            stats = accelerator.reduce(torch.cat([tick["loss_q"], tick["count_q"]]), reduction="sum").tolist()
            loss_q, count_q = stats[:4], stats[4:]
            ok_steps, bad_steps = tick["ok_steps"].item(), tick["bad_steps"].item()
            scaler_skips = tick["scaler_skips"].item()
            longest_bad = int(bad_run_max.item())
            elapsed = time.perf_counter() - tick_start
            metrics = {
                "train/loss": sum(loss_q) / max(sum(count_q), 1.0),
                **{f"train/loss_q{j + 1}": loss_q[j] / count_q[j] for j in range(4) if count_q[j]},
                "train/lr": lr,
                "train/grad_norm": tick["grad_norm"].item() / max(ok_steps, 1.0),
                "train/images_per_s": tick_steps * tc.batch_size / elapsed,
                "train/step_time_s": elapsed / tick_steps,
                "train/data_wait_s": data_wait_s / tick_steps,
                "train/nonfinite_steps": bad_steps,
                **({"train/loss_scaler_skips": scaler_skips} if loss_scaling else {}),
            }
            sink.log_metrics(metrics, step=step)
            accelerator.print(
                f"step {step}/{tc.total_steps}  loss {metrics['train/loss']:.4f}  lr {lr:.2e}  "
                f"{metrics['train/images_per_s']:.1f} img/s  data {metrics['train/data_wait_s'] * 1e3:.0f} ms/step"
                + (f"  non-finite {int(bad_steps)}" if bad_steps else "")
                + (f"  loss-scaler skips {int(scaler_skips)}" if scaler_skips else "")
            )
            if bad_steps and (tc.nonfinite_policy == "stop" or longest_bad >= tc.max_nonfinite_in_row):
                why = ("train.nonfinite_policy=stop" if tc.nonfinite_policy == "stop" else
                       f"{longest_bad} in a row >= train.max_nonfinite_in_row={tc.max_nonfinite_in_row}")
                sink.finish("FAILED")
                raise NonFiniteLossError(
                    f"non-finite loss/gradient in {int(bad_steps)} of the last {tick_steps} steps (ending at "
                    f"step {step}; {why}); those steps were skipped, the weights and EMA are untouched. The "
                    f"newest checkpoint in {out_dir} is clean: lower train.lr, check the data, or use bf16/no"
                )
            for v in tick.values():
                v.zero_()
            bad_run_max.copy_(bad_run)
            tick_start, tick_steps, data_wait_s = time.perf_counter(), 0, 0.0

        # Sample grid from the EMA (rank 0; a few DDIM steps, a few seconds on the demo).
        if tc.sample_every_steps and (step % tc.sample_every_steps == 0 or done) and accelerator.is_main_process:
            seeds = range(tc.sample_grid_images)
            images = sample(ema.model, diffusion, seeds, sampler="ddim", steps=tc.sample_ddim_steps,
                            batch_size=tc.sample_grid_images, device=device)
            sink.log_image(image_grid(images), key="samples/ema", step=step)

        # Preemption: all ranks agree (one tiny gloo all-reduce) every preempt_check_every_steps.
        # Every step would also work on CPU; on many GPU nodes it is a host round-trip per step.
        preempted = (step % tc.preempt_check_every_steps == 0 or done) and dist.any_true(bool(stop_signal))

        # Checkpoint: every rank takes part.
        if done or preempted or step % tc.checkpoint_every_steps == 0:
            path = save(finished=done)
            accelerator.print(f"checkpoint {path}")
        if step == stall_after and not done:
            accelerator.print(f"fault injection: stalling after step {step}", flush=True)
            time.sleep(3600)
        if preempted and not done:
            accelerator.print(f"preempted (signal {stop_signal[:1]}): checkpoint at step {step}, exiting with "
                              f"{PREEMPTED_EXIT_CODE}")
            exit_code = PREEMPTED_EXIT_CODE
            # The checkpoint is written. torchrun SIGTERMs the other workers as soon as one exits non-zero;
            # Python restores SIG_DFL for its handlers during interpreter shutdown, so that SIGTERM turned a
            # slower rank's exit 75 into a death by signal (-15). An ignored signal stays ignored through
            # shutdown; this is set before the last barrier, so on every rank before any rank exits.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            break

    if trace is not None:  # digests of this rank's final weights: tests compare them across ranks
        live = ema_source if ds_engine is not None else net
        for name, sd in (("params", live.state_dict()), ("ema", ema.weights())):
            blob = b"".join(v.detach().float().cpu().numpy().tobytes() for _, v in sorted(sd.items()))
            trace.write(f"{name} {hashlib.sha1(blob).hexdigest()}\n")
        trace.close()
    if exit_code == 0:
        checkpoint.mark_done(out_dir, step)
    stats = loader.stats
    if stats.get("skipped_samples") or stats.get("skipped_shards"):
        accelerator.print(f"data: skipped {stats}")
    sink.finish("FINISHED" if exit_code == 0 else "KILLED")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code
