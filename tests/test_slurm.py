"""The SLURM job scripts against a real two-node SLURM (slurmctld + two slurmd on 127.0.0.1), on CPU.

The first tests need only the cluster harness (tests/helpers/slurm.py); the end-to-end ones submit
launch/slurm/train.sbatch, evaluate.sbatch and sweep.sbatch with DDPM_CPU=1 (gloo, one process per node;
the evaluation after the preemption in two) on the bundled digits, with an MLflow SQLite store in a temporary
folder. The nodes have 2 CPUs each, so every training job asks for --cpus-per-task=1 (train.sbatch's default
is 24), except where the test is about the data workers that --cpus-per-task gives, and an evaluation job for
one CPU per process (evaluate.sbatch's default is 8).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.slurm import slurm_fixture  # noqa: F401  (the session fixture `slurm`)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
EVAL_SBATCH = REPO / "launch" / "slurm" / "evaluate.sbatch"
SWEEP_SBATCH = REPO / "launch" / "slurm" / "sweep.sbatch"
BATCH = 32  # global batch of the end-to-end runs
ONE_CPU = "--cpus-per-task=1"  # a node's task: one CPU for its training process, no data workers


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


# ------------------------------------------------------------------------------- the cluster itself


def test_two_node_job_runs_one_task_on_each_node(slurm, tmp_path):
    script = tmp_path / "nodes.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_NODEID on $SLURMD_NODENAME of $SLURM_NNODES\"'\n")
    out = tmp_path / "nodes.out"
    job = slurm.sbatch([script], options=["-N2", "--ntasks-per-node=1", f"--output={out}"])
    info = slurm.wait_done(job, timeout_s=60)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("task "))
    assert lines == ["task 0 on node1 of 2", "task 1 on node2 of 2"]


def test_usr1_reaches_the_batch_trap_and_the_job_requeues(slurm, tmp_path):
    # The mechanism train.sbatch relies on: `scancel --signal=USR1 --batch` (what --signal=B:USR1@120
    # sends before the time limit) runs the script's trap; `scontrol requeue` from there re-runs it.
    ready, out = tmp_path / "ready", tmp_path / "requeue.out"
    script = tmp_path / "requeue.sh"
    script.write_text(f"""#!/bin/bash
echo "run restart=${{SLURM_RESTART_COUNT:-0}}"
if [[ ${{SLURM_RESTART_COUNT:-0}} -ge 1 ]]; then exit 0; fi
got=0
trap 'got=1' USR1
sleep 60 &
touch {ready}
wait $!
if ((got)); then echo "trapped USR1"; kill $! 2>/dev/null; scontrol requeue "$SLURM_JOB_ID"; fi
""")
    job = slurm.sbatch([script], options=["--requeue", "--open-mode=append", f"--output={out}"])
    wait_for(ready.exists, 60, "the job start")
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job))
    pending = slurm.start_requeued_now(job, restarts=1, timeout_s=60)
    assert pending["Reason"] in ("BeginTime", "None", "Priority", "Resources")
    info = slurm.wait_done(job, timeout_s=60)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    # slurmstepd may add "CANCELLED ... DUE TO JOB REQUEUE" when the script has not ended yet.
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("slurmstepd")]
    assert lines == ["run restart=0", "trapped USR1", "run restart=1"]


def test_invalid_config_fails_before_any_node_starts(slurm, tmp_path):
    out = tmp_path / "bad.out"
    job = slurm.sbatch([TRAIN_SBATCH, "configs/digits.yaml", "train.total_steps=-3"],
                               options=["-N2", ONE_CPU, f"--output={out}"], env={"DDPM_CPU": "1"}, cwd=REPO)
    info = slurm.wait_done(job, timeout_s=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    text = out.read_text()
    assert "train.total_steps=-3 must be > 0" in text
    assert "accelerate" not in text  # no srun step was started


def test_a_gpu_job_that_leaves_a_gpu_without_a_data_worker_says_so_at_the_top_of_its_log(slurm, tmp_path):
    # 2 CPUs for 4 GPU processes per node: 2 / 4 - 1 < 1 worker each. The job is cancelled once it has said so
    # (the test nodes have no GPUs to run it on).
    out = tmp_path / "gpu.out"
    job = slurm.sbatch([TRAIN_SBATCH, "configs/digits.yaml", "train.total_steps=1"],
                       options=["-N1", "--cpus-per-task=2", f"--output={out}"], env={"GPUS_PER_NODE": "4"}, cwd=REPO)
    wait_for(lambda: out.is_file() and "data.num_workers=0" in out.read_text(), 60, "the data workers line")
    slurm.cmd("scancel", str(job))
    slurm.wait_done(job, timeout_s=60)
    lines = out.read_text().splitlines()
    warnings = [i for i, line in enumerate(lines) if "warning: --cpus-per-task=2 leaves each of the 4 GPU" in line]
    assert warnings == [0], lines[:5]  # one line, the log's first
    assert "ask for --cpus-per-task=12 (2 workers per GPU) or more" in lines[0]


# ------------------------------------------------------------------- end to end: train and evaluate


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    pytest.importorskip("pipeline.data.prepare", exc_type=ModuleNotFoundError)
    out = tmp_path_factory.mktemp("digits") / "shards"
    subprocess.run([sys.executable, "-m", "pipeline.data.prepare", "digits", "--out", str(out), "--quiet",
                    "--test-fraction", "0.1"], cwd=REPO, check=True, timeout=300)
    return out


def train_args(shards: Path, out_dir: Path, total_steps: int, checkpoint_every: int,
               workers: bool = True) -> list[str]:
    """train.sbatch's arguments; `workers`: data.num_workers=0 as an override (else from --cpus-per-task)."""
    return [str(TRAIN_SBATCH), "configs/digits.yaml",
            f"data.shards={shards}", *(["data.num_workers=0"] if workers else []),
            f"train.out_dir={out_dir}", f"train.batch_size={BATCH}", f"train.total_steps={total_steps}",
            f"checkpoint.every_steps={checkpoint_every}", "logging.every_steps=5",
            "logging.sample_every_steps=0", "preemption.check_every_steps=1", "checkpoint.keep=10",
            "tracking.experiment=slurm-test"]


def job_env(tmp_path: Path) -> dict[str, str]:
    """The job runs this interpreter's environment (VENV), CPU processes, an MLflow store in tmp_path."""
    in_venv = sys.prefix != sys.base_prefix
    return {"DDPM_CPU": "1", "OMP_NUM_THREADS": "1", "VENV": sys.prefix if in_venv else "",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}


def complete_steps(out_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out_dir.glob("step-*/COMPLETE"))


def meta(out_dir: Path, step: int) -> dict:
    return json.loads((out_dir / f"step-{step:08d}" / "meta.json").read_text())


# A small evaluation: batches of 16 so that two processes share both the sampling and bits/dim's 2 batches.
EVAL_OVERRIDES = ["eval.num_samples=50", "eval.steps=5", "eval.bpd_timesteps=4", "eval.bpd_max_images=32",
                  "eval.batch_size=16"]


def submit_train_and_eval(slurm, shards: Path, tmp_path: Path, total: int, every: int, dependency: str,
                          eval_args: list[str], eval_processes: int = 1) -> tuple[int, int]:
    """A 2-node training job (out_dir tmp_path/run, log train.out) and an evaluate.sbatch job (log eval.out,
    EVAL_OVERRIDES, `eval_processes` CPU processes with a CPU each) submitted with
    --dependency=<dependency>:<training job>."""
    env = job_env(tmp_path)
    job = slurm.sbatch(train_args(shards, tmp_path / "run", total, every),
                       options=["-N2", ONE_CPU, f"--output={tmp_path / 'train.out'}"], env=env, cwd=REPO)
    eval_job = slurm.sbatch(
        [EVAL_SBATCH, *eval_args, *EVAL_OVERRIDES],
        options=[f"--dependency={dependency}:{job}", f"--cpus-per-task={eval_processes}",
                 f"--output={tmp_path / 'eval.out'}"],
        env=env | {"GPUS_PER_NODE": str(eval_processes)}, cwd=REPO)
    return job, eval_job


def test_two_node_training_job_writes_checkpoints(slurm, digits_shards, tmp_path):
    # --cpus-per-task=2 (a whole test node): one CPU for the training process, one data worker beside it
    pytest.importorskip("pipeline.train.loop", exc_type=ModuleNotFoundError)
    out_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = slurm.sbatch(train_args(digits_shards, out_dir, total_steps=20, checkpoint_every=10, workers=False),
                               options=["-N2", "--cpus-per-task=2", f"--output={log}"], env=job_env(tmp_path), cwd=REPO)
    info = slurm.wait_done(job, timeout_s=180)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert info["NodeList"] == "node[1-2]"
    assert "data.num_workers=1: 2 CPU(s) per node for 1 training process(es)" in text
    config = (out_dir / "step-00000020" / "config.yaml").read_text()
    assert re.search(r"^  num_workers: 1$", config, re.M), config  # (the sweep test shows one that differs)

    # Both nodes took part: each srun task (--label "0:", "1:") trained in a world of 2.
    for task in (0, 1):
        assert re.search(rf"^{task}: training: world 2\b", text, re.M), text[-3000:]
        assert re.search(rf"^{task}: step 20/20\b", text, re.M), text[-3000:]
    assert complete_steps(out_dir) == [10, 20]
    assert (out_dir / "TRAINING_DONE").exists()
    final = meta(out_dir, 20)
    assert (final["world_size"], final["step"], final["images_seen"]) == (2, 20, 20 * BATCH)
    position = json.loads((out_dir / "step-00000020" / "data.json").read_text())  # one record of both ranks' streams
    assert (position["scope"], position["world_size"], len(position["skipped"])) == ("global", 2, 2)


def test_two_node_deepspeed_zero2_job_trains_and_checkpoints(slurm, digits_shards, tmp_path):
    # The DeepSpeed path of train.sbatch: ACCELERATE_CONFIG names configs/accelerate/deepspeed_zero2.yaml
    # (8 GPUs on 1 node); the script's machine and process settings override it (2 nodes x 1 process),
    # with the "standard" multinode launcher (one torchrun per node, no pdsh). DeepSpeed on CPU: DS_ACCELERATOR=cpu.
    pytest.importorskip("deepspeed")
    from tests.helpers.trainer import deepspeed_fp32

    out_dir, log = tmp_path / "run", tmp_path / "train.out"
    env = job_env(tmp_path) | {"ACCELERATE_CONFIG": "configs/accelerate/deepspeed_zero2.yaml", "DS_ACCELERATOR": "cpu"}
    job = slurm.sbatch(train_args(digits_shards, out_dir, total_steps=20, checkpoint_every=10),
                       options=["-N2", ONE_CPU, f"--output={log}"], env=env, cwd=REPO)
    info = slurm.wait_done(job, timeout_s=240)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    for task in (0, 1):
        assert re.search(rf"^{task}: training: world 2\b", text, re.M), text[-3000:]
        assert re.search(rf"^{task}: step 20/20\b", text, re.M), text[-3000:]
    assert complete_steps(out_dir) == [10, 20] and (out_dir / "TRAINING_DONE").exists()
    assert (meta(out_dir, 20)["world_size"], meta(out_dir, 20)["images_seen"]) == (2, 20 * BATCH)
    # ZeRO-2: the optimizer state is partitioned over the two ranks, one file each.
    parts = sorted(p.name for p in (out_dir / "step-00000020" / "accelerate" / "pytorch_model").glob("*optim_states.pt"))
    assert len(parts) == 2 and all(f"zero_pp_rank_{r}_" in parts[r] for r in (0, 1)), parts
    w10, w20 = deepspeed_fp32(out_dir / "step-00000010"), deepspeed_fp32(out_dir / "step-00000020")
    assert w10.keys() == w20.keys() and any(not (w10[k] == w20[k]).all() for k in w10)  # it trained
    assert all(v.isfinite().all() for v in w20.values())


def test_preemption_requeues_resumes_into_the_same_run_then_evaluation_follows(
        slurm, digits_shards, tmp_path, one_thread):  # one_thread: the in-process evaluation beside the jobs
    pytest.importorskip("pipeline.train.loop", exc_type=ModuleNotFoundError)
    evaluate = pytest.importorskip("evaluation.evaluate", exc_type=ModuleNotFoundError).evaluate
    from mlflow.tracking import MlflowClient

    total, every = 200, 20  # the preemption lands well before the end, however fast the steps
    out_dir, log, eval_log, env = tmp_path / "run", tmp_path / "train.out", tmp_path / "eval.out", job_env(tmp_path)
    ckpt = out_dir / f"step-{total:08d}"
    job, eval_job = submit_train_and_eval(slurm, digits_shards, tmp_path, total, every, "afterok",
                                          ["--checkpoint", str(ckpt)], eval_processes=2)

    # Preempt once the training loop runs (its first checkpoint is written).
    wait_for(lambda: complete_steps(out_dir), 150, "the first checkpoint")
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job))
    pending = slurm.start_requeued_now(job, restarts=1, timeout_s=120)
    text = log.read_text()
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text, text[-3000:]
    assert "no data worker" not in text  # CPU processes (DDPM_CPU=1): no GPU to starve
    preempt_step = max(complete_steps(out_dir))
    assert every <= preempt_step < total, text[-3000:]
    assert not (out_dir / "TRAINING_DONE").exists()
    assert pending["JobState"] == "PENDING"
    assert slurm.job(eval_job)["Reason"] == "Dependency"

    info = slurm.wait_done(job, timeout_s=180)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert f"job {job} restart 1:" in text
    # The resumed run started where the preempted one stopped and finished at the configured step.
    assert re.search(rf"^0: training: world 2, .* from step {preempt_step} to {total}\b", text, re.M), text[-3000:]
    assert (out_dir / "TRAINING_DONE").exists()
    first, final = meta(out_dir, preempt_step), meta(out_dir, total)
    assert first["step"] == preempt_step and not first["finished"]
    assert (final["step"], final["images_seen"], final["world_size"]) == (total, total * BATCH, 2)

    # One MLflow run holds the whole training: loss logged before and after the preemption.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("slurm-test").experiment_id])
    assert [r.info.run_id for r in runs] == [final["mlflow_run_id"]]
    assert first["mlflow_run_id"] == final["mlflow_run_id"]
    loss_steps = sorted({m.step for m in client.get_metric_history(final["mlflow_run_id"], "train/loss")})
    assert loss_steps[0] <= preempt_step < loss_steps[-1] == total
    assert client.get_run(final["mlflow_run_id"]).info.status == "FINISHED"

    # The same evaluation in this process, one process, while the job evaluates with two.
    one = evaluate(ckpt, EVAL_OVERRIDES, log_to_run=False, out_dir=str(tmp_path / "one"))

    # The evaluation job ran only after the training job completed, in 2 processes, and logged into that run.
    eval_info = slurm.wait_done(eval_job, timeout_s=180)
    text = eval_log.read_text()
    assert (eval_info["JobState"], eval_info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert eval_info["StartTime"] >= info["EndTime"]  # ISO timestamps compare as strings
    assert "2 CPU processes (gloo) (accelerate launch)" in text and "on 2 processes" in text, text[-3000:]
    provenance = json.loads((out_dir / "eval" / f"step-{total:08d}" / "provenance.json").read_text())
    assert (provenance["world_size"], one.provenance["world_size"]) == (2, 1)
    assert provenance["bpd"]["num_images"] == one.provenance["bpd"]["num_images"] == 32
    run = client.get_run(final["mlflow_run_id"])
    fid_keys = [k for k in run.data.metrics if k.startswith("eval/fid")]
    assert fid_keys, sorted(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, fid_keys[0])] == [total]
    assert run.data.metrics[fid_keys[0]] > 0
    # The figures of one process (tests/test_evaluate.py's tolerances): the same images, their features
    # extracted in other batches (FID equal up to float rounding); bits/dim's per-image terms are the same.
    assert run.data.metrics[fid_keys[0]] == pytest.approx(one.metrics[fid_keys[0]], rel=1e-6)
    assert (run.data.metrics["eval/bpd"], run.data.metrics["eval/bpd_se"]) == \
        (one.metrics["eval/bpd"], one.metrics["eval/bpd_se"])


def test_preempted_two_node_job_requeued_onto_one_node_finishes_the_epoch_with_each_sample_once(
        slurm, digits_shards, tmp_path):
    """A requeued job comes back on a smaller allocation: the 2-node job is preempted (USR1) mid-epoch, its
    pending requeue is shrunk to 1 node, and the 1-process job continues the epoch where the 2-process one
    stopped. The tests' entry point (TRAIN_SCRIPT) traces the sample indices of every step on every rank."""
    pytest.importorskip("pipeline.train.loop", exc_type=ModuleNotFoundError)
    total, every, n = 60, 10, 1617  # digits' training split: 1,617 samples, 51 steps of 32 an epoch
    out_dir, log, idx = tmp_path / "run", tmp_path / "train.out", tmp_path / "idx"
    idx.mkdir()
    env = job_env(tmp_path) | {"TRAIN_SCRIPT": "tests/helpers/train_entry.py", "DDPM_TRACE_INDICES_DIR": str(idx),
                               "DDPM_FAULT_STEP_SLEEP_S": "0.3"}  # slow steps: the signal lands mid-epoch
    job = slurm.sbatch(train_args(digits_shards, out_dir, total, every),
                       options=["-N2", ONE_CPU, f"--output={log}"], env=env, cwd=REPO)
    wait_for(lambda: complete_steps(out_dir), 150, "the first checkpoint")
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job))
    slurm.wait_job(job, lambda i: i.get("JobState") == "PENDING" and int(i.get("Restarts", 0)) >= 1, 120)
    # Held while it is changed (an update of a pending job may let it start at once), then 1 node, released.
    # (What a user does with `scontrol update` for a job that cannot get its nodes back; or submit with
    # --nodes=1-2 and let SLURM choose.)
    slurm.cmd("scontrol", "hold", str(job))
    slurm.cmd("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1")  # one task a node (train.sbatch)
    assert "node=1," in slurm.job(job).get("TRES", "") + ","  # what it will ask for (NumNodes shows it later)
    slurm.cmd("scontrol", "release", str(job))
    slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_done(job, timeout_s=240)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "node1"), text[-3000:]
    resumed = re.search(rf"^0: training: world 1, micro batch 32, .* from step (\d+) to {total}\b", text, re.M)
    assert resumed, text[-3000:]
    stop = int(resumed.group(1))
    assert stop in complete_steps(out_dir) and 0 < stop * BATCH < n, text[-3000:]  # preempted inside epoch 0
    assert "was written by 2 processes, this job has 1: resuming at the same global data position" in text
    steps: dict[int, list[int]] = {}
    for rank_file in sorted(idx.glob("rank-*.idx")):  # rank 1: the first job; rank 0: both, in order
        for line in rank_file.read_text().splitlines():
            step, _, indices = line.split()
            steps.setdefault(int(step), []).append([int(i) for i in indices.split(",")])
    assert sorted(steps) == list(range(total))
    assert all(len(steps[s]) == (2 if s < stop else 1) for s in steps)  # two ranks before, one after
    sequence = [i for s in range(total) for part in steps[s] for i in part]
    assert sorted(sequence[:n]) == list(range(n))  # epoch 0 across both jobs: every sample exactly once
    assert sorted(sequence[n:2 * n]) == sorted(set(sequence[n:2 * n]))  # epoch 1 has begun, nothing twice


def test_watcher_job_evaluates_each_checkpoint_once_while_training_runs(slurm, digits_shards, tmp_path):
    # evaluate.sbatch's watcher mode, the way its header says to submit it: `--dependency=after:TRAIN`
    # starts it once training has started; it evaluates every complete checkpoint once and ends by itself
    # once TRAINING_DONE is there. The 2-node training holds one of each node's two CPUs, so both run at once.
    pytest.importorskip("evaluation.watch", exc_type=ModuleNotFoundError)
    from mlflow.tracking import MlflowClient

    total, every = 60, 20
    out_dir, log, eval_log, env = tmp_path / "run", tmp_path / "train.out", tmp_path / "eval.out", job_env(tmp_path)
    job, eval_job = submit_train_and_eval(slurm, digits_shards, tmp_path, total, every, "after",
                                          ["--watch", str(out_dir), "--poll-s", "1", "--max-wait-s", "300"])

    info = slurm.wait_done(job, timeout_s=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    eval_info = slurm.wait_done(eval_job, timeout_s=240)
    text = eval_log.read_text()
    assert (eval_info["JobState"], eval_info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    # Started by the training's start (in the runs here, the same second); not asserted to overlap it, which
    # would depend on the scheduler's pace against an ~20 s training.
    assert info["StartTime"] <= eval_info["StartTime"]  # ISO timestamps compare as strings
    assert "nothing new" not in text  # it ended because training was done, not after --max-wait-s

    ledger = json.loads((out_dir / "eval" / "ledger.json").read_text())
    final = meta(out_dir, total)
    assert sorted(ledger["checkpoints"]) == [f"step-{s:08d}" for s in (20, 40, 60)]
    assert all(e["status"] == "ok" and e["run_id"] == final["mlflow_run_id"] for e in ledger["checkpoints"].values())
    assert [int(m) for m in re.findall(r"^step (\d+)  \(ema weights", text, re.M)] == [20, 40, 60], text[-3000:]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    fid_keys = [k for k in client.get_run(final["mlflow_run_id"]).data.metrics if k.startswith("eval/fid")]
    assert fid_keys
    assert sorted(m.step for m in client.get_metric_history(final["mlflow_run_id"], fid_keys[0])) == [20, 40, 60]


def test_scripts_pass_shellcheck():
    from tests.helpers.slurm import SlurmUnavailable, ensure_installed

    try:
        ensure_installed()  # installs shellcheck with the SLURM packages (Debian's), as CI does
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    scripts = [TRAIN_SBATCH, EVAL_SBATCH, SWEEP_SBATCH, *sorted((REPO / "launch" / "slurm").glob("*.sh")),
               *sorted((REPO / "benchmarks").glob("*.sh"))]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "")


def test_scancel_checkpoints_and_does_not_requeue(slurm, digits_shards, tmp_path):
    # `scancel JOB` sends SIGTERM to every process of the job: node_task.sh passes it to the training
    # processes (torchrun would kill them 30 s later), they write a checkpoint; a cancel is not requeued.
    pytest.importorskip("pipeline.train.loop", exc_type=ModuleNotFoundError)
    out_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = slurm.sbatch(train_args(digits_shards, out_dir, total_steps=2000, checkpoint_every=1000),
                       options=["-N2", ONE_CPU, f"--output={log}"], env=job_env(tmp_path), cwd=REPO)
    # Cancel once both nodes log training steps; no periodic checkpoint is due before step 1000.
    wait_for(lambda: log.exists() and all(re.search(rf"^{t}: step \d+/2000", log.read_text(), re.M) for t in (0, 1)),
             150, "training steps on both nodes")
    slurm.cmd("scancel", str(job))
    info = slurm.wait_done(job, timeout_s=60)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    steps = complete_steps(out_dir)
    assert len(steps) == 1 and 5 <= steps[0] < 1000, text[-3000:]
    assert (meta(out_dir, steps[0])["step"], meta(out_dir, steps[0])["finished"]) == (steps[0], False)
    for task in (0, 1):
        assert re.search(rf"^{task}: preempted\b.*\bstep {steps[0]}\b", text, re.M), text[-3000:]
    assert not (out_dir / "TRAINING_DONE").exists()
    assert "requeueing" not in text


# ------------------------------------------------------------------------------- sweeps: a job array


def test_sweep_array_trains_evaluates_and_compares_as_one_table(slurm, digits_shards, tmp_path):
    """sweep.sbatch: a 3-element array over a grid file; each element trains (1 node, 1 CPU: data.num_workers=0
    derived from --cpus-per-task, replacing the config's 1), evaluates its final checkpoint, and logs into the
    one MLflow store tagged sweep=<array job id>; compare --tag shows those three runs, and no other."""
    pytest.importorskip("evaluation.evaluate", exc_type=ModuleNotFoundError)
    from mlflow.tracking import MlflowClient

    grid = tmp_path / "grid.txt"
    grid.write_text("# learning rates\noptimizer.lr=1e-3\n\noptimizer.lr=2e-3 ema.decay=0.99\noptimizer.lr=5e-4\n")
    common = [f"data.shards={digits_shards}", f"train.batch_size={BATCH}", "train.total_steps=4",
              "checkpoint.every_steps=4", "logging.every_steps=2", "logging.sample_every_steps=0",
              "tracking.experiment=sweep-test", "eval.feature_extractor=digits", "eval.num_samples=20", "eval.steps=3",
              "eval.bpd_timesteps=2", "eval.bpd_max_images=16"]
    env = job_env(tmp_path) | {"SWEEP_OUT": str(tmp_path / "runs")}
    store = env["MLFLOW_TRACKING_URI"]
    array = slurm.sbatch([SWEEP_SBATCH, grid, "configs/digits.yaml", *common],
                         options=["--array=0-2", ONE_CPU, f"--output={tmp_path}/sweep-%a.out"], env=env, cwd=REPO)
    elements = slurm.wait_array_done(array, 3, timeout_s=600)
    logs = [(tmp_path / f"sweep-{i}.out").read_text() for i in range(3)]
    for info, text in zip(elements, logs):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    for i, lr in enumerate(["0.001", "0.002", "0.0005"]):
        out_dir = tmp_path / "runs" / f"sweep-{array}-{i}"
        assert (out_dir / "TRAINING_DONE").exists(), logs[i][-3000:]
        config = (out_dir / "step-00000004" / "config.yaml").read_text()
        assert re.search(rf"^  lr: {lr}$", config, re.M) and re.search(r"^  num_workers: 0$", config, re.M)
        assert f"element {i}: training done; evaluating {out_dir}" in logs[i]
    # one store, three runs tagged with the sweep, each with the FID of its final checkpoint
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("sweep.element") for r in runs) == ["0", "1", "2"]
    assert {r.data.tags.get("sweep") for r in runs} == {str(array)}
    assert all(r.data.metrics.get("eval/fid_digits", 0) > 0 for r in runs)
    client.create_run(exp.experiment_id, run_name="not-in-the-sweep")  # same experiment, no sweep tag

    def compare(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evaluation.compare", "--experiment", "sweep-test",
                               "--tracking-uri", store, "--out", str(tmp_path / "cmp"), *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    r = compare("--tag", f"sweep={array}")
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("\nwrote ")[0].splitlines()
    header, rows = table[0], table[2:]
    assert sorted(row.split()[0] for row in rows) == [f"sweep-{array}-{i}" for i in range(3)], r.stdout  # by start
    assert "optimizer.lr" in header and "ema.decay" in header and "best eval/fid_digits" in header
    assert (tmp_path / "cmp" / "fid_vs_step.png").is_file()
    assert len(compare().stdout.split("\nwrote ")[0].splitlines()) == 2 + 4  # without --tag: the other run too
    missing = compare("--tag", "sweep=999999")
    assert missing.returncode == 2 and "no runs of experiment 'sweep-test' with tag sweep=999999" in missing.stderr
