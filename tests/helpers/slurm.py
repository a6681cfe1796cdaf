"""A real two-node SLURM cluster on 127.0.0.1, for tests and for trying the job scripts locally.

Debian's slurmctld/slurmd (22.05) run as root from a temporary folder: one controller and two slurmd
processes on distinct ports, both with ``NodeAddr=127.0.0.1`` (Debian builds SLURM with
``MULTIPLE_SLURMD``), so ``sbatch -N2`` gets two real nodes. State, spool, logs and PID files all lie
under that folder; nothing in /etc is touched. Clients find the cluster through ``SLURM_CONF``.

In tests (the fixture has session scope and stops the daemons also when a test fails)::

    from tests.helpers.slurm import slurm_fixture  # noqa: F401  (provides the fixture `slurm`)

    def test_x(slurm):
        job = slurm.sbatch(["launch/slurm/train.sbatch", "configs/digits.yaml"], options=["-N2", "--cpus-per-task=1"])
        info = slurm.wait_done(job, timeout_s=120)
        array = slurm.sbatch(["launch/slurm/sweep.sbatch", "grid.txt", "configs/digits.yaml"], options=["--array=0-2"])
        elements = slurm.wait_array_done(array, 3, timeout_s=300)

For developers::

    python -m tests.helpers.slurm up      # prints `export SLURM_CONF=...`
    python -m tests.helpers.slurm status
    python -m tests.helpers.slurm down

Settings (measured on SLURM 22.05, docs/slurm.md): auth/none + cred/none (no munge),
proctrack/pgid (linuxproc leaked a trap's background child), task/none, select/cons_tres with CR_CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "shellcheck")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "shellcheck")  # shellcheck: the job scripts' linter
NODES = ("node1", "node2")
PARTITION = "debug"
CPUS_PER_NODE = 2
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "ddpm-slurm"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (not root, or no binaries and no apt-get). Tests skip with this message."""


# ---------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------


def missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if _which(b) is None]


def _which(name: str) -> str | None:
    # slurmctld/slurmd live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def ensure_installed(timeout_s: float = 900) -> None:
    """Install Debian's SLURM packages if a binary is missing (``apt-get update`` once, then install)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        raise SlurmUnavailable("the local SLURM cluster needs Linux")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local SLURM cluster runs its daemons as root; run the SLURM tests as root")
    missing = missing_binaries()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM binaries {missing} are missing and apt-get is not available; "
                               f"install slurmctld, slurmd and the SLURM client tools")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    still = missing_binaries()
    if still:
        raise RuntimeError(f"installed {APT_PACKAGES} but {still} are still not on PATH")


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS reports free now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_conf(root: Path, ctld_port: int, node_ports: Sequence[int]) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=ddpmtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_ports[0]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/none",
        "CredType=cred/none",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        # The main scheduler also runs on events; short intervals make dependencies and requeues prompt.
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (there is no accounting db)
        "KillWait=10",
        "InactiveLimit=0",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
    ]
    lines += [f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={CPUS_PER_NODE} State=UNKNOWN"
              for n, p in zip(NODES, node_ports)]
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


# ---------------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------------


def _split_show(line: str) -> dict[str, str]:
    """Parse one line of ``scontrol show -o``: ``Key=value Key2=value with spaces ...``."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=", line))
    out = {}
    for m, nxt in zip(keys, [*keys[1:], None]):
        out[m.group(1)] = line[m.end(): nxt.start() if nxt else len(line)].strip()
    return out


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    pids: dict[str, int] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs (sbatch exports it to the job by default)."""
        path = os.environ.get("PATH", "")
        if "/usr/sbin" not in path.split(":"):
            path = f"{path}:/usr/sbin"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    # -- client commands ----------------------------------------------------------------------------

    def cmd(self, *args: str, check: bool = True, timeout_s: float = 30, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout_s)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
        return proc

    def sbatch(self, script_and_args: Sequence[str | Path], options: Sequence[str] = (),
               env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id. ``env`` adds to the cluster's environment (exported to the job)."""
        out = self.cmd("sbatch", "--parsable", *options, *map(str, script_and_args), env=env, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.cmd("scontrol", "-o", "show", "job", str(job_id))
        return _split_show(out.stdout.strip().splitlines()[0])

    def nodes_in_state(self, state: str) -> set[str]:
        out = self.cmd("sinfo", "-h", "-N", "-t", state, "-o", "%N", check=False)
        return set(out.stdout.split())

    def wait_job(self, job_id: int, until, timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll ``scontrol show job`` until ``until(info)`` is true; a timeout error shows the logs."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} did not reach the expected state within {timeout_s:.0f} s; "
                           f"last: JobState={info.get('JobState')} Reason={info.get('Reason')}\n{self.log_tail()}")

    def wait_done(self, job_id: int, timeout_s: float) -> dict[str, str]:
        return self.wait_job(job_id, lambda i: i.get("JobState") in FINISHED_STATES, timeout_s)

    def array_elements(self, array_id: int) -> list[dict[str, str]]:
        """The records of a job array's elements (pending ones may share one record, ArrayTaskId=1-2)."""
        out = self.cmd("scontrol", "-o", "show", "job", str(array_id))
        return [_split_show(line) for line in out.stdout.strip().splitlines() if line.strip()]

    def wait_array_done(self, array_id: int, elements: int, timeout_s: float, poll_s: float = 1) -> list[dict[str, str]]:
        """Poll until each of the array's `elements` has finished; their records by ArrayTaskId."""
        deadline = time.monotonic() + timeout_s
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.array_elements(array_id)
            done = [r for r in records if r.get("ArrayTaskId", "").isdigit() and r.get("JobState") in FINISHED_STATES]
            if len(done) == len(records) == elements:
                return sorted(done, key=lambda r: int(r["ArrayTaskId"]))
            time.sleep(poll_s)
        states = [(r.get("ArrayTaskId"), r.get("JobState"), r.get("Reason")) for r in records]
        raise TimeoutError(f"array {array_id} not done within {timeout_s:.0f} s: {states}\n{self.log_tail()}")

    def start_requeued_now(self, job_id: int, restarts: int, timeout_s: float) -> dict[str, str]:
        """Wait until the job is pending again after its ``restarts``-th requeue, then lift the wait.

        SLURM holds a requeued job for ~2 minutes (Reason=BeginTime); ``StartTime=now`` starts it at once.
        Returns the job's record while it was pending.
        """
        pending = self.wait_job(job_id, lambda i: i.get("JobState") == "PENDING"
                                and int(i.get("Restarts", 0)) >= restarts, timeout_s)
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return pending

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path, timeout_s: float = 30, detach: bool = False) -> SlurmCluster:
        """Write slurm.conf under ``root``, start slurmctld and two slurmd, wait until both nodes are idle."""
        ensure_installed()
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + len(NODES))
        conf = write_conf(root, ports[0], ports[1:])
        cluster = cls(root=root, conf=conf)
        # -c: start from an empty state (no jobs of an earlier cluster in the same folder).
        daemons = [("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(conf)])]
        daemons += [(f"slurmd-{n}", [_which("slurmd"), "-D", "-f", str(conf), "-N", n]) for n in NODES]
        try:
            for name, argv in daemons:
                with open(root / "log" / f"{name}.out", "ab") as out:
                    proc = subprocess.Popen(argv, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=detach)
                cluster._procs.append(proc)
                cluster.pids[name] = proc.pid
            (root / "pids.json").write_text(json.dumps(cluster.pids))
            cluster._wait_idle(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} at start-up\n{self.log_tail()}")
            if self.nodes_in_state("idle") == set(NODES):
                return
            time.sleep(0.3)
        raise TimeoutError(f"nodes {NODES} not idle within {timeout_s:.0f} s\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel every job, stop the daemons by PID, then end any job process of this cluster left over."""
        daemons_alive = any(_alive(p) for p in self.pids.values())
        if daemons_alive:
            out = self.cmd("squeue", "-h", "-o", "%i", check=False, timeout_s=10)
            jobs = out.stdout.split()
            if jobs:
                self.cmd("scancel", *jobs, check=False, timeout_s=10)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    busy = self.cmd("squeue", "-h", "-t", "R,CG,PD", "-o", "%i", check=False, timeout_s=10)
                    if not busy.stdout.split() and not self.nodes_in_state("completing"):
                        break
                    time.sleep(0.5)
        # slurmd first, so no node reports to a controller that is gone.
        for name in sorted(self.pids, key=lambda n: n == "slurmctld"):
            _terminate(self.pids[name], timeout_s=10)
        for proc in self._procs:
            proc.poll()  # reap our own children
        for pid in self.leftover_pids():
            _terminate(pid, timeout_s=5)
        (self.root / "pids.json").unlink(missing_ok=True)

    def leftover_pids(self) -> list[int]:
        """Job processes and slurmstepd of this cluster: their environment names our slurm.conf."""
        marker = f"SLURM_CONF={self.conf}".encode()
        own = {os.getpid(), os.getppid()}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in own:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in environ and (cmdline.startswith(b"slurmstepd")
                                      or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)):
                found.append(int(entry.name))
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, timeout_s: float) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# pytest fixture
# ---------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the CLI works without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session", name="slurm")
    def slurm_fixture() -> Iterator[SlurmCluster]:
        """A running two-node cluster for the test session; its daemons are stopped afterwards."""
        try:
            ensure_installed()
        except SlurmUnavailable as exc:
            pytest.skip(str(exc))
        # slurmd's spool paths must stay short (unix sockets are limited to 108 bytes).
        root = Path(tempfile.mkdtemp(prefix="slurm-"))
        cluster = SlurmCluster.start(root)
        try:
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.slurm", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"state folder (default {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    pids_file = root / "pids.json"
    if args.action == "up":
        if pids_file.exists() and any(_alive(p) for p in json.loads(pids_file.read_text()).values()):
            print(f"a cluster already runs from {root}; `python -m tests.helpers.slurm down` first", file=sys.stderr)
            return 1
        cluster = SlurmCluster.start(root, detach=True)
        print(f"SLURM is up: nodes {', '.join(NODES)} on 127.0.0.1, logs in {root}/log\n"
              f"export SLURM_CONF={cluster.conf}")
        return 0
    if not pids_file.exists():
        print(f"no cluster recorded in {root}", file=sys.stderr)
        return 1 if args.action == "down" else 3
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", pids=json.loads(pids_file.read_text()))
    if args.action == "status":
        alive = {n: _alive(p) for n, p in cluster.pids.items()}
        print(json.dumps(alive))
        print(cluster.cmd("sinfo", "-N", check=False).stdout, end="")
        return 0 if all(alive.values()) else 3
    cluster.stop()
    print(f"stopped the cluster in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
