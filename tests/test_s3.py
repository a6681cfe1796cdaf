"""Shards in object storage, against a real S3 server on 127.0.0.1 (moto's standalone server, tests/helpers/s3.py).

prepare writes to s3:// byte for byte what it writes locally; the loader streams s3:// in exact mode with the
manifest and index read from the store, every sample verified, each byte read once; transient faults are
retried before a shard counts as failed; a training from s3:// resumes mid-epoch bitwise like one from local
shards (1 and 2 processes); evaluation reads the same s3:// data; a missing bucket, a wrong endpoint or
missing credentials is one line saying what to set. Endpoint and credentials come from the standard AWS_*
variables only, and the secret key never reaches a log or MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.prepare import main as prepare_main
from pipeline.data.report import CorruptDataWarning, DataError
from pipeline.data.sequential import iter_split, split_batches
from tests.helpers import trainer as h
from tests.helpers.corrupt import read_bytes, write_bytes
from tests.helpers.data import copy_folder, make_shards, member_spans, to_u8
from tests.helpers.s3 import FlakyProxy, aws_env, free_port, s3_server  # noqa: F401  (the fixture)
from tests.test_data_index import BIG_PER_SHARD, epoch_read

S3_N = 5 * BIG_PER_SHARD  # the 64 x 4 read-once test over S3

BUCKET = "ddpm-test"
PREPARE_ARGS = ["digits", "--quiet", "--test-fraction", "0.1", "--samples-per-shard", "300"]


@pytest.fixture
def aws(s3_server, monkeypatch):  # noqa: F811
    with aws_env(s3_server, monkeypatch) as env:
        yield env


@pytest.fixture(scope="module")
def prepared(s3_server, tmp_path_factory):  # noqa: F811
    """The digits prepared twice with the same options: into a local folder, and into s3://BUCKET/digits."""
    local = tmp_path_factory.mktemp("local") / "digits"
    url = f"s3://{BUCKET}/digits"
    with pytest.MonkeyPatch.context() as mp, aws_env(s3_server, mp):
        s3_server.make_bucket(BUCKET)
        assert prepare_main([*PREPARE_ARGS, "--out", str(local)]) == 0
        assert prepare_main([*PREPARE_ARGS, "--out", url]) == 0
    return local, url


def epoch(shards: str, *, world: int = 1, rank: int = 0, workers: int = 0, batches: int = 0, **kw):
    loader = StreamingLoader(DataConfig(shards=shards, num_workers=workers, **kw), batch_size=8, rank=rank,
                             world_size=world)
    it = iter(loader)
    out = [(b["index"].tolist(), to_u8(b["image"]).tobytes(), b["label"].tolist())
           for b in (next(it) for _ in range(batches or loader.batches_per_epoch + 1))]
    it.close()
    return out, loader


def test_prepare_to_s3_is_byte_identical_to_a_local_prepare(prepared, s3_server, aws, capsys):  # noqa: F811
    local, url = prepared
    names = sorted(os.listdir(local))
    assert names == s3_server.keys(url)
    assert "manifest.json" in names and "train-index.safetensors" in names and "test-000000.tar" in names
    for name in names:
        assert s3_server.get(f"{url}/{name}") == (local / name).read_bytes(), name
    # a non-empty prefix is refused unless --overwrite, which replaces what prepare wrote (and leaves the rest)
    s3_server.put(f"{url}-2/notes.txt", b"mine")
    assert prepare_main([*PREPARE_ARGS, "--out", f"{url}-2"]) == 2
    assert "is not empty (1 objects, e.g. notes.txt); pass --overwrite" in capsys.readouterr().err
    assert prepare_main([*PREPARE_ARGS, "--out", f"{url}-2", "--overwrite"]) == 0
    assert s3_server.keys(f"{url}-2") == sorted([*names, "notes.txt"])
    # a bucket that is not there: one line naming it and what to set
    assert prepare_main([*PREPARE_ARGS, "--out", "s3://no-such-bucket/digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bucket 'no-such-bucket' does not exist at http://127.0.0.1:" in err[0]
    assert "AWS_ENDPOINT_URL" in err[0]


def test_exact_epochs_from_s3_are_the_local_ones_and_every_sample_is_verified(prepared, s3_server, aws,  # noqa: F811
                                                                                tmp_path):
    local, url = prepared
    for rank in (0, 1):  # 2 ranks x 2 DataLoader workers (forked: each builds its own S3 client)
        from_s3, loader = epoch(url, world=2, rank=rank, workers=2)
        assert loader.num_samples == 1617 and len(loader.shardset.index) == 6  # manifest and index from the store
        assert from_s3 == epoch(str(local), world=2, rank=rank, workers=2)[0]  # bit for bit, same order
    # a sample changed in the store is caught by the stream that reads it (sha256 against the index)
    bad = copy_folder(str(local), str(tmp_path / "bad"))
    path = os.path.join(bad, "train-000002.tar")
    name, _, at = member_spans(path)[2 * 7 + 1]  # sample 7's .cls
    data = read_bytes(path)
    data[at] = ord(str((int(chr(data[at])) + 1) % 10))
    write_bytes(path, data)
    s3_server.upload_folder(bad, f"s3://{BUCKET}/digits-bad")
    with pytest.warns(CorruptDataWarning, match=r"s3://ddpm-test/digits-bad/train-000002\.tar: its sha256 of "
                                                rf"sample 7 \(key {name.split('.')[0]}\)"):
        got, loader = epoch(f"s3://{BUCKET}/digits-bad")
    assert loader.stats["skipped_shards"] >= 1 and 2 * 300 + 7 not in {i for idx, _, _ in got for i in idx}


def test_each_byte_is_read_once_from_s3_at_64_ranks_x_4_workers(s3_server, aws, tmp_path):  # noqa: F811
    # 5 of the local test's 50 shards: a range request per sample costs the S3 stand-in ~6 ms of CPU
    folder, _ = make_shards(str(tmp_path), S3_N, per_shard=BIG_PER_SHARD, channels=1, encoding="u8", labels=False)
    url = s3_server.upload_folder(folder, f"s3://{BUCKET}/big")
    read, size, delivered = epoch_read(url)
    assert sorted(delivered) == list(range(S3_N))  # each sample once, each verified (strict: nothing skipped)
    assert size == sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".tar"))
    assert size <= read <= 1.05 * size, read / size


def test_transient_faults_are_retried_before_a_shard_counts_as_failed(prepared, s3_server, monkeypatch):  # noqa: F811
    from pipeline.data import remote

    local, url = prepared
    # The lower layers alone (botocore, s3fs: their retries are off here, tenacity's are the policy) let a
    # dropped connection through: three drops fail a request.
    proxy = FlakyProxy(s3_server.port, drop=3)
    try:
        with aws_env(s3_server, monkeypatch, endpoint=proxy.endpoint):
            fs, path = remote.filesystem(f"{url}/manifest.json")
            with pytest.raises(Exception, match="Connection was closed"):
                fs.cat_file(path)
    finally:
        proxy.close()
    # Through the loader, 8 dropped connections cost nothing: every sample arrives, no shard is skipped.
    proxy = FlakyProxy(s3_server.port, drop=8)
    try:
        with aws_env(s3_server, monkeypatch, endpoint=proxy.endpoint), warnings.catch_warnings():
            warnings.simplefilter("error", CorruptDataWarning)
            got, loader = epoch(url)
        assert proxy.dropped == 8 and proxy.forwarded > 0
        assert loader.stats["skipped_shards"] == loader.stats["skipped_samples"] == 0
        assert got == epoch(str(local))[0]
    finally:
        proxy.close()
    # A store that keeps failing: the read fails after RETRY_ATTEMPTS, as one line, in bounded time.
    proxy = FlakyProxy(s3_server.port, drop=10**9)
    try:
        with aws_env(s3_server, monkeypatch, endpoint=proxy.endpoint):
            t0 = time.monotonic()
            with pytest.raises(DataError, match=rf"manifest {url}/manifest\.json cannot be read .*after "
                                                rf"{remote.RETRY_ATTEMPTS} attempts") as err:
                StreamingLoader(DataConfig(shards=url, num_workers=0), batch_size=8)
            assert time.monotonic() - t0 < 60 and len(str(err.value).splitlines()) == 1
    finally:
        proxy.close()


@pytest.mark.parametrize("case", ["no bucket", "wrong endpoint", "no credentials"])
def test_a_store_that_cannot_be_read_is_one_line_saying_what_to_set(s3_server, monkeypatch, case):  # noqa: F811
    url = f"s3://{BUCKET}/digits"
    with aws_env(s3_server, monkeypatch):
        if case == "no bucket":
            url, message = "s3://no-such-bucket/digits", r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"
        elif case == "wrong endpoint":
            port = free_port()  # nothing listens there
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            message = rf"cannot reach the object store at http://127\.0\.0\.1:{port} .*set AWS_ENDPOINT_URL"
        else:
            monkeypatch.delenv("AWS_ACCESS_KEY_ID")
            monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
            message = r"no credentials for s3://.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        t0 = time.monotonic()
        with pytest.raises(DataError, match=message) as err:
            StreamingLoader(DataConfig(shards=url, num_workers=0), batch_size=8)
        assert time.monotonic() - t0 < 30 and len(str(err.value).splitlines()) == 1


def test_training_with_a_missing_bucket_exits_2_with_one_line(s3_server, tmp_path):  # noqa: F811
    r = h.run(h.train_cmd(["data.shards=s3://no-such-bucket/digits", f"train.out_dir={tmp_path}/run"]),
              h.env(**s3_server.env()), timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "bucket 'no-such-bucket' does not exist" in last and "AWS_ENDPOINT_URL" in last
    assert not (tmp_path / "run").exists()


class RecordingExtractor:
    """A feature extractor that keeps the images the reference statistics are computed from."""

    name, weights_sha256, fid_mode = "recorder", "0" * 64, "clean"

    def __init__(self):
        self.images: np.ndarray | None = None

    def __call__(self, images: np.ndarray, desc: str = "") -> np.ndarray:
        self.images = images
        return images.reshape(len(images), -1)[:, :6].astype(np.float64)


def test_evaluation_reads_reference_statistics_and_held_out_batches_from_s3(prepared, aws, tmp_path):
    from evaluation.fid import reference_from_shards

    local, url = prepared
    got, want = RecordingExtractor(), RecordingExtractor()
    ref = reference_from_shards(url, "train", got, cache_dir=str(tmp_path / "s3-stats"))
    reference_from_shards(str(local), "train", want, cache_dir=str(tmp_path / "local-stats"))
    assert ref.provenance["count"] == 1617 and np.array_equal(got.images, want.images)
    for a, b in zip(split_batches(url, "test", 16), split_batches(str(local), "test", 16), strict=True):
        assert torch.equal(a["image"].view(torch.int32), b["image"].view(torch.int32))
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
    assert len(list(iter_split(url, "test"))) == 180


# ---- trainings: from local shards, and from s3:// killed mid-epoch and resumed ----------------------------


def _train(shards, out: Path, nproc: int, environ: dict[str, str], extra: list[str], stall: bool = False):
    def cmd() -> list[str]:  # a fresh rendezvous port per launch
        return h.train_cmd([f"data.shards={shards}", f"train.out_dir={out}/run", "train.total_steps=8",
                            "checkpoint.every_steps=2", "checkpoint.keep=10", *extra], nproc=nproc,
                           port=h.free_port())

    env = h.launch_env(multi=nproc > 1, DDPM_TRACE_BATCHES_DIR=str(out / "trace"), **environ)
    (out / "trace").mkdir(parents=True, exist_ok=True)
    if not stall:
        r = h.run(cmd(), env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr
    log = out / "killed.log"
    # the run stalls once checkpoint 4 is written (a test hook): mid-epoch (202 batches of 8 per epoch)
    proc = h.start(cmd(), {**env, "DDPM_FAULT_STALL_AFTER_STEP": "4"}, log)
    h.wait_for(lambda: 4 in h.complete_steps(out / "run"), 300, proc, "checkpoint 4")
    workers = h.workers(proc) if nproc > 1 else {}
    h.kill_group(proc, signal.SIGKILL)
    h.signal_pids(workers.values(), signal.SIGKILL)
    proc.wait(30)
    h.wait_for(lambda: not any(h.alive(p) for p in workers.values()), 30, None, "the workers' end")
    assert max(h.complete_steps(out / "run")) == 4
    r = h.run(cmd(), env)
    assert r.returncode == 0 and "at step 4" in r.stdout, r.stderr[-3000:]
    return log.read_text() + r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_from_s3_resumes_mid_epoch_bitwise_like_from_local_shards(prepared, s3_server, tmp_path,  # noqa: F811
                                                                           nproc):
    local, url = prepared
    extra = ["data.num_workers=1"] if nproc == 1 else []  # one process: its loader worker reads S3 itself
    _train(local, tmp_path / "local", nproc, {}, extra)
    tracking = []
    if nproc == 1:  # the store the secret must stay out of
        tracking = ["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=s3"]
    logs = _train(url, tmp_path / "s3", nproc, s3_server.env(), [*extra, *tracking], stall=True)
    a, b = tmp_path / "local" / "run" / "step-00000008", tmp_path / "s3" / "run" / "step-00000008"
    assert h.same(h.params(a), h.params(b)) and h.same(h.ema(a), h.ema(b))
    for rank in range(nproc):
        assert h.trace(tmp_path / "local" / "trace", rank) == h.trace(tmp_path / "s3" / "trace", rank)
        assert h.digests(tmp_path / "local" / "trace", rank) == h.digests(tmp_path / "s3" / "trace", rank)
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())
    if nproc == 1:
        from mlflow import MlflowClient

        secret = s3_server.secret
        assert secret not in logs
        for p in (tmp_path / "s3" / "run").rglob("*"):
            if p.is_file() and p.suffix in (".json", ".yaml", ".txt", ""):
                assert secret.encode() not in p.read_bytes(), p
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        [run] = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
        assert run.data.params["data.shards"] == url
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v]
        config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "artifacts"))
        assert secret not in Path(config).read_text()
