"""The tests' single-process Python commands (a training, an evaluation, a comparison), forked from a server that
has imported torch, accelerate, MLflow and our packages once, instead of each starting a new interpreter that
imports them again (3-5 CPU-s a command on 2 cores: most of a tiny training's cost).

``run``/``start`` take the command as the tests write it (``[python, script.py, args...]`` or
``[python, -m, module, args...]``) and behave as ``subprocess.run``/``Popen`` do for it: the environment, the
working directory, ``sys.argv``, stdout/stderr to pipes or a log, a session of its own (``start_new_session``), the
exit status (``sys.exit``'s, 1 with a traceback for an uncaught exception, -N for a death by signal N), non-daemon
threads joined and atexit handlers run before the exit. The server is multiprocessing's ``forkserver``: a fresh
interpreter that only imports (no thread pool of torch's has started in it), so a fork of it is safe, as it is
for the DataLoader's workers.

``accelerate launch`` of one node is forked too: accelerate's own launch command runs in a forked process (its
checks and the environment it gives the workers are accelerate's), and where it would start torchrun's agent
the workers are forked from it with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...);
the first worker to fail stops the others, and the launch exits 1 naming each failed rank (not torchrun's
ChildFailedError report: a test that reads that report runs the real launcher, ``run(..., real=True)``).

``DDPM_TESTS_FORK=0`` in the tests' environment starts every command as a new process instead (to tell a failure
of the fork path from one of the code).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
PRELOAD = ["torch", "numpy", "PIL.Image", "safetensors.torch", "omegaconf", "webdataset", "accelerate",
           "accelerate.commands.launch", "torch.distributed.run", "deepspeed", "mlflow", "pipeline.config",
           "pipeline.train.loop", "launch.train", "tests.helpers.faults", "evaluation.evaluate", "evaluation.compare"]
_CONTEXT: Any = None


def enabled() -> bool:
    return os.environ.get("DDPM_TESTS_FORK", "1") != "0"


def is_launch(cmd: list[str]) -> bool:
    """``accelerate launch`` (this environment's) of one node."""
    if len(cmd) < 3 or cmd[:2] != [ACCELERATE, "launch"] or "--num_machines" not in cmd:
        return False
    return cmd[cmd.index("--num_machines") + 1] == "1"


def forkable(cmd: list[str], cwd: Path = REPO) -> bool:
    """A command of this interpreter running one of our scripts or modules, or an ``accelerate launch`` of one node
    (its workers forked, torchrun's agent left out)."""
    if not enabled() or len(cmd) < 2:
        return False
    if is_launch(cmd):
        script = next((c for c in cmd if c.endswith(".py")), "")
        return bool(script) and (Path(cwd) / script).resolve().is_relative_to(REPO)
    if cmd[0] != sys.executable:
        return False
    if cmd[1] == "-m":
        return len(cmd) > 2 and cmd[2].split(".")[0] in ("launch", "pipeline", "evaluation")
    return cmd[1].endswith(".py") and (Path(cwd) / cmd[1]).resolve().is_relative_to(REPO)


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _enter(environ: dict[str, str], cwd: str, out: str, err: str | None) -> None:
    """In a forked process: a session of its own, stdout/stderr into ``out``/``err``, the environment, the cwd."""
    os.setsid()
    fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if err else fd_out
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _become(argv: list[str], environ: dict[str, str], cwd: str) -> None:
    """Run ``argv`` (``[python, script.py | -m module, args...]``) here as a new interpreter would, then exit."""
    import torch  # preloaded

    if environ.get("OMP_NUM_THREADS", "").isdigit():  # what torch reads when a new interpreter imports it
        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    warnings.resetwarnings()
    if environ.get("PYTHONWARNINGS"):
        warnings._processoptions(environ["PYTHONWARNINGS"].split(","))  # what the interpreter does at start
    extra = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    code = 0
    try:
        import runpy

        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path[:] = [cwd, *extra, *[p for p in sys.path if p not in extra and p != cwd]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            here = str(Path(argv[1]).resolve().parent)
            sys.path[:] = [here, *extra, *[p for p in sys.path if p not in extra and p != here]]
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # the interpreter's own report of an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        threading._shutdown()  # what the interpreter does at exit: join non-daemon threads, then atexit
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(code)


def _child(argv: list[str], environ: dict[str, str], cwd: str, out: str, err: str | None) -> None:
    """In the forked process: become the command, run it, exit with its status."""
    _enter(environ, cwd, out, err)
    _become(argv, environ, cwd)


class _WorkersFailed(Exception):
    pass


def _fork_workers(args: Any) -> None:
    """torchrun's ``run(args)`` for one node, as ``accelerate launch`` calls it: the workers forked from here (a
    fork of the pre-imported server) with the environment torchrun gives them; the first failure stops the others
    (SIGTERM), as torchrun does. Raises _WorkersFailed naming each failed rank."""
    nproc, node_rank = int(args.nproc_per_node), int(args.node_rank)
    nnodes = int(str(args.nnodes).split(":")[-1])
    world = nproc * nnodes
    script = [sys.executable, *(["-m"] if args.module else []), args.training_script, *args.training_script_args]
    pids: dict[int, int] = {}
    for local in range(nproc):
        rank = node_rank * nproc + local
        worker_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank), GROUP_WORLD_SIZE=str(nnodes),
                          ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world), ROLE_NAME="default",
                          MASTER_ADDR=str(args.master_addr), MASTER_PORT=str(args.master_port),
                          TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                          TORCHELASTIC_RUN_ID=str(args.rdzv_id or "none"), TORCHELASTIC_USE_AGENT_STORE="False")
        worker_env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default with several processes
        pid = os.fork()
        if pid == 0:
            os.environ.clear()
            os.environ.update(worker_env)
            _become(script, worker_env, os.getcwd())
        pids[pid] = rank
    failed: dict[int, int] = {}
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed[rank] = code
            for other in pids:  # the first failure ends the launch
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    if failed:
        raise _WorkersFailed("; ".join(f"rank {r} exited with {c}" for r, c in sorted(failed.items())))


def _launch(argv: list[str], environ: dict[str, str], cwd: str, out: str, err: str | None) -> None:
    """``accelerate launch ...`` as the tests run it: accelerate's own launch command (its checks, the
    environment it gives the workers), with torchrun's start of the workers replaced by ``_fork_workers``."""
    _enter(environ, cwd, out, err)
    code = 0
    try:
        import torch.distributed.run as distrib_run
        from accelerate.commands.launch import launch_command, launch_command_parser

        distrib_run.run = _fork_workers
        launch_command(launch_command_parser().parse_args(argv[2:]))
    except SystemExit as exc:
        code = _exit_code(exc)
    except _WorkersFailed as exc:
        print(f"forked launch: {exc}", file=sys.stderr)
        code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(code)


class Forked:
    """The ``subprocess.Popen`` calls the tests make, for a forked command."""

    def __init__(self, cmd: list[str], environ: dict[str, str], cwd: Path, out: Path, err: Path | None):
        self.args = cmd
        target = _launch if is_launch(cmd) else _child
        self._process = _context().Process(target=target, args=(cmd, environ, str(cwd), str(out),
                                                                str(err) if err else None), daemon=False)
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(cmd: list[str], environ: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, env=environ, cwd=cwd, capture_output=True, text=True, timeout=timeout)``."""
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = Forked(cmd, environ, cwd, out, err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def start(cmd: list[str], environ: dict[str, str], cwd: Path, log: Path) -> Forked:
    """``subprocess.Popen(cmd, env=environ, cwd=cwd, stdout=log, stderr=STDOUT, start_new_session=True)``."""
    log.write_text("")
    return Forked(cmd, environ, cwd, log, None)
