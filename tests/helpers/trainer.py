"""Helpers for the trainer tests: small real shards, real launches (python / accelerate launch)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tests.helpers import zygote

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LAUNCH = REPO / "launch" / "train.py"  # the entry point itself
# launch/train.py with the DDPM_FAULT_* / DDPM_TRACE_BATCHES_DIR / DDPM_CUDA_SYNC_CHECK hooks (tests/helpers/faults.py)
ENTRY = REPO / "tests" / "helpers" / "train_entry.py"

# A tiny U-Net on 8x8 grey images: seconds per test on 2 shared cores.
TINY = [
    "model.image_size=8", "model.channels=1", "model.base_channels=32", "model.channel_mult=[1,2]",
    "model.num_res_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0.1",
    "diffusion.timesteps=100",
    "data.num_workers=0", "data.shuffle_buffer=50", "data.hflip=false",
    "train.batch_size=8", "optimizer.lr=1e-3", "optimizer.warmup_steps=2", "logging.every_steps=2",
    "logging.sample_every_steps=0", "ema.decay=0.9", "preemption.check_every_steps=1",
    "train.deterministic=true", "tracking.enabled=false",
    "tracking.log_model=false",  # when a test turns tracking on: logging the model costs seconds (tests/test_mlflow_model.py)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_digits(out: Path) -> Path:
    from pipeline.data.prepare import prepare

    prepare("digits", str(out), samples_per_shard=300, progress=False, workers=1)
    return out


def prepare_identical(out: Path, n: int = 64) -> Path:
    """n copies of one 8x8 digit: every batch is the same whichever rank or order draws it."""
    from sklearn.datasets import load_digits

    img = (load_digits().images[0] * (255 / 16)).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / f"{out.name}.npy"
    np.save(src, np.repeat(img[None], n, axis=0))
    from pipeline.data.prepare import prepare

    prepare(str(src), str(out), samples_per_shard=16, progress=False, workers=1)
    return out


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MLFLOW_", "DDPM_"))}
    # the repository first; what PYTHONPATH held already (e.g. packages carried to a GPU machine) after it
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path, TOKENIZERS_PARALLELISM="false",
             PYTHONWARNINGS="ignore")
    e.update(extra)
    return e


def train_cmd(overrides: list[str], nproc: int = 1, *, deepspeed_stage: int = 0, machines: int = 1,
              machine_rank: int = 0, port: int | None = None, mixed_precision: str = "no",
              script: Path = ENTRY) -> list[str]:
    """A training launch (python, or accelerate launch for several processes or DeepSpeed) of ``script``: by
    default ENTRY, launch/train.py with the fault hooks (inert unless a DDPM_* variable is set); LAUNCH for a
    test of the entry point itself."""
    script = [str(script), "--config", str(REPO / "configs" / "digits.yaml"), *TINY, *overrides]
    if nproc == 1 and machines == 1 and not deepspeed_stage:
        return [PY, *script]
    port = port or free_port()
    common = ["--num_processes", str(nproc), "--num_machines", str(machines), "--machine_rank", str(machine_rank),
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
              "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if deepspeed_stage:
        return [ACCELERATE, "launch", "--use_deepspeed", "--zero_stage", str(deepspeed_stage),
                "--gradient_accumulation_steps", "1", *common, *script]
    return [ACCELERATE, "launch", "--multi_gpu", *common, *script]


def launch_env(multi: bool = False, deepspeed: bool = False, **extra: str) -> dict[str, str]:
    """Environment of a launch: DeepSpeed on CPU needs DS_ACCELERATOR=cpu, gloo DDP needs ACCELERATE_USE_CPU=1."""
    if deepspeed:
        return env(DS_ACCELERATOR="cpu", **extra)
    return env(ACCELERATE_USE_CPU="1", **extra) if multi else env(**extra)


def run(cmd: list[str], environ: dict[str, str], timeout: float = 300, cwd: Path = REPO,
        real: bool = False) -> subprocess.CompletedProcess:
    """The command's run, as ``subprocess.run`` gives it; a process of ours, or an ``accelerate launch`` of one node,
    is forked from a pre-imported server (tests/helpers/zygote.py); ``real``: started anew (a test of the launcher
    itself: torchrun's report of failed workers)."""
    if not real and zygote.forkable(cmd, cwd):
        return zygote.run(cmd, environ, cwd, timeout)
    return subprocess.run(cmd, env=environ, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen | zygote.Forked:
    """The command started in a session of its own, stdout and stderr into ``log``; one process of ours is forked
    (tests/helpers/zygote.py), a launch of several starts anew (the tests find its workers: ``workers``)."""
    if zygote.forkable(cmd) and not zygote.is_launch(cmd):
        return zygote.start(cmd, environ, REPO, log)
    f = open(log, "w")  # noqa: SIM115 - closed with the process by the caller's wait
    return subprocess.Popen(cmd, env=environ, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and its workers (they share the session we started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def complete_steps(out_dir: Path) -> list[int]:
    from pipeline.checkpoint.folder import complete_checkpoints

    return [int(p.name.split("-")[1]) for p in complete_checkpoints(out_dir)]


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights of a (non-DeepSpeed) checkpoint folder."""
    return load_file(str(ckpt / "accelerate" / "model.safetensors"))


def ema(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "ema.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def trace(trace_dir: Path, rank: int = 0) -> dict[tuple[int, int], str]:
    """{(step, micro): batch hash}; a step re-run after a resume overwrites the killed run's line."""
    out: dict[tuple[int, int], str] = {}
    for line in (trace_dir / f"rank-{rank}.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[(int(parts[0]), int(parts[1]))] = parts[2]
    return out


def digests(trace_dir: Path, rank: int = 0) -> dict[str, str]:
    """{"params": sha1, "ema": sha1} of a rank's final weights (the last ones written)."""
    lines = [ln.split() for ln in (trace_dir / f"rank-{rank}.txt").read_text().splitlines()]
    return {p[0]: p[1] for p in lines if len(p) == 2}


def deepspeed_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a DeepSpeed checkpoint (all ZeRO partitions merged)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "accelerate"), tag="pytorch_model")
    return {k.removeprefix("net."): v.float() for k, v in sd.items()}


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes of an ``accelerate launch`` (its direct children), as
    launch/slurm/node_task.sh finds them: torchrun puts each in a session of its own, so a signal to the
    launcher's group does not reach them."""
    out: dict[int, int] = {}
    for tasks in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in map(int, tasks.read_text().split()):
                with contextlib.suppress(OSError):
                    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
                                   if "=" in kv)
                    cmdline = Path(f"/proc/{pid}/cmdline").read_text()
                    if "RANK" in environ and any(name in cmdline for name in ("train.py", ENTRY.name)):
                        out[int(environ["RANK"])] = pid
    return out


def signal_pids(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def torchrun_failures(log_text: str) -> dict[int, tuple[int, int]]:
    """{rank: (exitcode, pid)} from torchrun's ChildFailedError report in a launcher's output."""
    pattern = r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)"
    return {int(r): (int(code), int(pid)) for r, code, pid in re.findall(pattern, log_text)}


def deepspeed_adam_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Adam's step count and moments of every ZeRO-1/2 partition of a DeepSpeed checkpoint,
    {"rank<r>.<step|exp_avg|exp_avg_sq>": tensor}, read with weights_only=True (three DeepSpeed classes
    allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out: dict[str, torch.Tensor] = {}
    files = sorted((ckpt / "accelerate" / "pytorch_model").glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    assert files, f"no ZeRO optimizer partitions in {ckpt}"
    for path in files:
        rank = int(path.name.split("zero_pp_rank_")[1].split("_")[0])  # bf16 runs prefix "bf16_"
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        for i, state in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].items():
            out |= {f"rank{rank}.{i}.{k}": torch.as_tensor(v) for k, v in state.items()}
    return out
