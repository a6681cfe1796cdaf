"""What we read from files someone else may have written (docs/security.md), attacked:

- a resolver (``${oc.env:SECRET}``) in a config file, an override or a checkpoint's config.yaml is refused with one
  line, and the secret appears in no output, no written file and no MLflow store;
- names in a checkpoint's meta.json, in a manifest (shards, sample index) and post-hoc snapshots that leave their
  folder (``..``, an absolute path, a symlink) are refused with one line, and the file outside is never hashed;
- a checkpoint whose config.yaml carries a ``pipe:`` command (or a URL) for its data is evaluated only with the
  data given on the command line; its meta.json's MLflow server only when the user names it;
- JSON nested 100000 deep or over its size cap (meta.json, manifest.json, data.json, a safetensors header) exits 2
  with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.errors import EvaluationError
from evaluation.evaluate import logging_target, main
from pipeline.checkpoint.folder import Checkpoint, CheckpointError, resolve_resume
from pipeline.config import ConfigError, load_config
from pipeline.data.index import decode
from pipeline.data.manifest import ManifestError, name_in, read_manifest, untyped_source
from pipeline.files import (
    JSON_MAX_BYTES,
    LARGE_JSON_MAX_BYTES,
    SAFETENSORS_HEADER_MAX_BYTES,
    UnsafeFileError,
)
from tests.helpers.evaluation import prepare_digits, tiny_config, training_run, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-7f1c9b2e-never-to-be-seen"
FAST_EVAL = ["eval.feature_extractor=none", "eval.bpd_split=''", "eval.num_samples=4", "eval.grid_images=4"]


def _one_error_line(err: str, prog: str = "evaluate") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


@pytest.fixture
def ckpt(digits, tmp_path) -> Path:
    """A complete tiny checkpoint (step 10) of a run in tmp_path/run, evaluated in a second on the CPU."""
    return write_checkpoint(tiny_config(digits, tmp_path / "run", FAST_EVAL), 10)


def _outside(tmp_path: Path) -> tuple[Path, str]:
    """A file outside every folder under test, and the first 12 hex digits of its sha256 (what a message that
    hashed it would show)."""
    path = tmp_path / "outside" / "private.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("a file no checkpoint or data set may make us read\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------------------ config interpolation


def test_a_plain_reference_still_resolves_and_an_escaped_resolver_stays_text(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: mine\ntrain:\n  out_dir: runs/${name}\ndata:\n  shards: d\n  manifest: '\\${oc.env:X}'\n")
    cfg = load_config(cfg_file)
    assert cfg.train.out_dir == "runs/mine" and cfg.data.manifest == "${oc.env:X}"


@pytest.mark.parametrize("value", ["${oc.env:SECRET_FOR_TEST}", "${oc.env:SECRET_FOR_TEST,fallback}",
                                   "a-${oc.decode:'${oc.env:SECRET_FOR_TEST}'}", "${name}-${oc.create:x}",
                                   "${train.${oc.env:SECRET_FOR_TEST}}"])
def test_every_resolver_is_refused_in_an_override_naming_the_key(value, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", SECRET)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.shards=d", f"tracking.run_name={value}"])
    assert "tracking.run_name" in str(err.value) and "resolver" in str(err.value)
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("where", ["config file", "override"])
def test_an_env_secret_in_a_training_config_is_refused_and_never_appears(where, digits, tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    shards = f"data:\n  shards: {digits}\n"
    store = tmp_path / "mlflow.db"
    overrides = ["tracking.enabled=true", f"tracking.uri=sqlite:///{store}", "train.total_steps=2"]
    if where == "config file":
        cfg_file.write_text("name: ${oc.env:SOME_SECRET}\n" + shards)
    else:
        cfg_file.write_text("name: plain\n" + shards)
        overrides.append("name=${oc.env:SOME_SECRET}")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg_file), *overrides],
                       cwd=tmp_path, env={**os.environ, "SOME_SECRET": SECRET}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "resolver oc.env" in lines[0] and "=VALUE" in lines[0], r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert not _files_holding(tmp_path, SECRET.encode())  # no runs/<secret>, no config.yaml, no MLflow store
    assert not (tmp_path / "runs").exists()


def test_an_env_secret_in_a_checkpoint_config_is_refused_and_never_appears(digits, tmp_path, empty_store, capsys,
                                                                          monkeypatch):
    store = tmp_path / "mlflow.db"
    shutil.copy(empty_store, store)
    uri = f"sqlite:///{store}"
    ckpt = write_checkpoint(tiny_config(digits, tmp_path / "run", FAST_EVAL), 10, run_id=training_run(uri),
                            tracking_uri=uri)
    config = ckpt / "config.yaml"
    config.write_text(config.read_text().replace("name: tiny", "name: ${oc.env:SOME_SECRET}"))
    monkeypatch.setenv("SOME_SECRET", SECRET)
    assert main(["--checkpoint", str(ckpt)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "config.yaml: name='${oc.env:SOME_SECRET}' calls the resolver oc.env" in line
    assert SECRET not in captured.out + captured.err
    assert not _files_holding(tmp_path, SECRET.encode())  # the figures folder, the MLflow store
    assert not (tmp_path / "run" / "eval").exists()


# ------------------------------------------------------------------------------ names inside their folder


def _tamper_meta(ckpt: Path, names: dict[str, str]) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"] = names
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "snapshot symlink"])
def test_a_checkpoint_naming_a_file_outside_is_refused_in_one_line_without_reading_it(attack, ckpt, tmp_path,
                                                                                       capsys):
    outside, digest = _outside(tmp_path)
    if attack == "dotdot":
        _tamper_meta(ckpt, {"../../outside/private.txt": "0" * 64})
    elif attack == "absolute":
        _tamper_meta(ckpt, {str(outside): "0" * 64})
    elif attack == "symlink":
        (ckpt / "notes.txt").symlink_to(outside)
        _tamper_meta(ckpt, {"notes.txt": "0" * 64})
    else:  # a post-hoc snapshot that is a link out: unrecorded, found by listing posthoc/
        (ckpt / "posthoc").mkdir()
        (ckpt / "posthoc" / "sigma0.05-step00000010.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(ckpt).verify()
    assert "is refused" in str(err.value) and "\n" not in str(err.value)
    assert ("symlink" in str(err.value)) == ("symlink" in attack)
    assert main(["--checkpoint", str(ckpt), "--no-log"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "only names inside" in line and digest not in line


def test_resume_falls_back_from_a_checkpoint_naming_files_outside_and_refuses_it_when_asked_for(digits, tmp_path,
                                                                                                  capsys):
    cfg = tiny_config(digits, tmp_path / "run")
    older, newer = write_checkpoint(cfg, 10), write_checkpoint(cfg, 20, seed=1)
    outside, digest = _outside(tmp_path)
    _tamper_meta(newer, {"../../outside/private.txt": "0" * 64})
    assert resolve_resume(tmp_path / "run", "auto") == older
    said = capsys.readouterr().err
    assert f"checkpoint {newer} fails verification" in said and digest not in said
    with pytest.raises(CheckpointError) as err:
        resolve_resume(tmp_path / "run", str(newer))
    assert "leads out of the folder" in str(err.value) and "\n" not in str(err.value)
    # evaluate on the run folder: the newest intact one, as for any other damaged checkpoint
    assert main(["--checkpoint", str(tmp_path / "run"), "--no-log", *FAST_EVAL]) == 0
    assert f"evaluating its newest complete checkpoint {older}" in capsys.readouterr().out


def _copy_data(digits: str, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(digits, out)
    return out


@pytest.mark.parametrize("attack", ["dotdot shard", "absolute shard", "symlink shard", "dotdot index"])
def test_a_manifest_naming_a_file_outside_is_refused_in_one_line_without_reading_it(attack, digits, ckpt, tmp_path,
                                                                                     capsys):
    data = _copy_data(digits, tmp_path)
    outside, digest = _outside(tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    if attack == "dotdot shard":
        train["shards"][0]["name"] = "../outside/private.txt"
    elif attack == "absolute shard":
        train["shards"][0]["name"] = str(outside)
    elif attack == "symlink shard":
        (data / train["shards"][0]["name"]).unlink()
        (data / train["shards"][0]["name"]).symlink_to(outside)
    else:
        train["index"]["name"] = "../outside/private.txt"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as err:
        read_manifest(data)
    assert "is refused" in str(err.value) and "\n" not in str(err.value)
    # evaluate reads the held-out split's manifest for bits/dim: the data set is refused there, in one line
    assert main(["--checkpoint", str(ckpt), "--no-log", f"data.shards={data}", "eval.bpd_split=test"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "only names inside" in line and digest not in line


def test_remote_and_local_names_that_stay_inside_are_read():
    assert name_in("s3://bucket/digits", "train-000000.tar", "a shard name") == "s3://bucket/digits/train-000000.tar"
    assert name_in("https://host/d", "sub/train-000000.tar", "a shard name") == "https://host/d/sub/train-000000.tar"
    for bad in ("../x.tar", "/x.tar", "s3://other/x.tar", "pipe:cat x.tar", "", None, "a/../../x.tar"):
        with pytest.raises(UnsafeFileError):
            name_in("s3://bucket/digits", bad, "a shard name")


# ------------------------------------------------------------------------------ a checkpoint's config runs nothing


@pytest.mark.parametrize("key,value,says", [
    ("shards", "pipe:touch {marker}; cat {data}/train-000000.tar", "the shell command"),
    ("shards", "http://127.0.0.1:9/train-{{000000..000003}}.tar", "the URL"),
    ("manifest", "s3://bucket/digits/manifest.json", "the URL"),
])
def test_a_checkpoint_config_that_would_run_or_fetch_its_data_is_refused_unless_given_on_the_command_line(
        key, value, says, digits, ckpt, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    value = value.format(marker=marker, data=digits)
    config = ckpt / "config.yaml"
    text = config.read_text()
    if key == "shards":
        text = text.replace(f"shards: {digits}", f"shards: '{value}'")
    else:
        text = text.replace("manifest: ''", f"manifest: '{value}'")
    config.write_text(text)
    assert value in text
    assert main(["--checkpoint", str(ckpt), "--no-log", "eval.bpd_split=test"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"sets data.{key} to {says}" in line and f"data.{key}=" in line
    assert not marker.exists()
    given = [f"data.shards={digits}"] + (["data.manifest=''"] if key == "manifest" else [])
    assert main(["--checkpoint", str(ckpt), "--no-log", "eval.bpd_split=test", *given]) == 0
    assert "bpd" in capsys.readouterr().out and not marker.exists()


def test_an_mlflow_server_named_by_a_checkpoint_is_used_only_when_the_user_names_it(ckpt, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = "http://127.0.0.1:9"
    meta = json.loads((ckpt / "meta.json").read_text()) | {"mlflow_run_id": "0" * 32, "mlflow_tracking_uri": server}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert main(["--checkpoint", str(ckpt)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"names the MLflow run {'0' * 32} on {server}" in line and f"tracking.uri={server}" in line
    assert not (ckpt.parent / "eval").exists()  # refused before sampling
    assert logging_target(meta, ckpt, [f"tracking.uri={server}"]) == ("0" * 32, server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server + "/")
    assert logging_target(meta, ckpt) == ("0" * 32, server)
    with pytest.raises(EvaluationError):  # the server the user named is another one
        logging_target(meta | {"mlflow_tracking_uri": "https://elsewhere"}, ckpt)
    local = meta | {"mlflow_tracking_uri": "sqlite:////tmp/x/mlflow.db"}
    assert logging_target(local, ckpt)[1] == "sqlite:////tmp/x/mlflow.db"  # a local store, as recorded


def test_untyped_sources_are_commands_and_urls_not_local_paths():
    assert untyped_source("data/digits") == untyped_source("/d/train-{000..009}.tar") == ""
    assert untyped_source("file:///d/train-000000.tar") == ""
    assert untyped_source("/d/a.tar::pipe:curl -s http://x/b.tar").startswith("the shell command")
    assert untyped_source("gs://b/d/train-{000..009}.tar").startswith("the URL")


# ------------------------------------------------------------------------------ malformed JSON


def _deep() -> str:
    return "[" * 100_000


def _over(limit: int) -> str:
    return json.dumps({"step": 10, "pad": "x" * limit})


@pytest.mark.parametrize("content,says", [(_deep, "nests deeper than"), (lambda: _over(JSON_MAX_BYTES), "MiB"),
                                          (lambda: "{", "not valid JSON"), (lambda: "[1, 2]", "cannot be read")])
def test_a_malformed_meta_json_exits_2_with_one_line(content, says, ckpt, capsys):
    (ckpt / "meta.json").write_text(content())
    assert main(["--checkpoint", str(ckpt), "--no-log"]) == 2
    assert says in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content,says", [(_deep, "nests deeper than"),
                                          (lambda: _over(LARGE_JSON_MAX_BYTES), "refused unread"),
                                          (lambda: '{"format": 1, "splits": 3}', "malformed")])
def test_a_malformed_manifest_exits_2_with_one_line(content, says, digits, ckpt, tmp_path, capsys):
    data = _copy_data(digits, tmp_path)
    (data / "manifest.json").write_text(content())
    with pytest.raises(ManifestError) as err:
        read_manifest(data)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert main(["--checkpoint", str(ckpt), "--no-log", f"data.shards={data}", "eval.bpd_split=test"]) == 2
    assert says in _one_error_line(capsys.readouterr().err)


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    path.write_bytes(change(header, body))


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("attack,says", [
    ("nested metadata", "nests deeper than"),
    ("huge length", "refused unread"),
    ("header over the cap", "refused unread"),
    ("length past the end", "cut short"),
    ("header not JSON", "not a readable safetensors file"),
])
def test_a_malformed_safetensors_header_exits_2_with_one_line(attack, says, ckpt, capsys):
    def change(header: dict, body: bytes) -> bytes:
        if attack == "nested metadata":
            header["__metadata__"]["step"] = _deep()
        elif attack == "huge length":
            return struct.pack("<Q", 1 << 62) + b"{}"
        elif attack == "header over the cap":
            header["__metadata__"]["pad"] = json.dumps("x" * SAFETENSORS_HEADER_MAX_BYTES)
        elif attack == "length past the end":
            return struct.pack("<Q", 1 << 20) + b"{}"
        else:
            return struct.pack("<Q", 8) + b"[[[[[[[[" + body
        return _with_header(header, body)

    _rewrite_header(ckpt / "ema.safetensors", change)
    assert main(["--checkpoint", str(ckpt), "--no-log"]) == 2
    assert says in _one_error_line(capsys.readouterr().err)


def test_a_deep_loader_state_and_an_index_with_a_huge_header_are_refused(ckpt):
    (ckpt / "data.json").write_text(_deep())
    with pytest.raises(UnsafeFileError, match="nests deeper than"):  # resume turns it into a CheckpointError
        Checkpoint(ckpt).part_state("data", rank=None)
    with pytest.raises(ManifestError, match="refused unread"):
        decode(struct.pack("<Q", 1 << 40) + b"{}", {"train-000000.tar": 1}, "train-index.safetensors")
