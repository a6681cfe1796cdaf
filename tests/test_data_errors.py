"""Data input errors end training with exit code 2 and one line naming the path or key; documented
commands work as pasted into a shell."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.helpers import trainer as h
from tests.helpers.data import copy_folder, make_shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return h.prepare_digits(root / "digits")


def _changed_shard(prepared: Path, tmp: Path) -> Path:
    folder = Path(copy_folder(str(prepared), str(tmp / "changed")))
    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # in the tar's end padding: it parses and decodes; only its sha256 differs
    shard.write_bytes(bytes(data))
    return folder


CASES = {  # data.shards (relative to tmp), extra overrides, what the one line must say
    "missing folder": (lambda p, t: t / "nowhere", [], r"data\.shards='\S*nowhere' does not exist"),
    "empty folder": (lambda p, t: (t / "empty").mkdir() or t / "empty", [],
                     r"data\.shards='\S*empty' is empty; prepare the data into it: "
                     r"python -m pipeline\.data\.prepare"),
    "folder without manifest": (
        lambda p, t: (Path(copy_folder(str(p), str(t / "bare"))) / "manifest.json").unlink() or t / "bare",
        [],
        r"data\.shards='\S*bare' holds 6 \.tar files \(train-000000\.tar, \.\.\.\) but no manifest\.json"),
    "unknown split": (lambda p, t: p, ["data.split=valid"],
                      r"split 'valid' is not in the manifest at \S+; it has \['train'\]"),
    "changed shard, verify=start, strict": (
        _changed_shard, ["data.verify=start", "data.strict=true"],
        r"data\.verify=start: 1 of 6 shards differ from their manifest: \S*train-000000\.tar: its sha256"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_data_input_error_exits_2_with_one_line(prepared, tmp_path, case):
    shards, overrides, message = CASES[case]
    out_dir = tmp_path / "run"
    data = shards(prepared, tmp_path)
    r = h.run(h.train_cmd([f"data.shards={data}", f"train.out_dir={out_dir}", *overrides]), h.env())
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("[rank 0] error: ") and re.search(message, lines[0]), lines[0]
    assert not out_dir.exists()  # the loader is built before the run's folder


def test_a_strict_error_in_a_loader_worker_is_one_line(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data.loader import StreamingLoader
    from pipeline.data.report import CorruptDataError

    folder, _ = make_shards(str(tmp_path), 12, per_shard=4)
    with open(os.path.join(folder, "train-000001.tar"), "r+b") as f:
        f.truncate(700)
    loader = StreamingLoader(DataConfig(shards=folder, num_workers=2, strict=True), batch_size=4)
    with pytest.raises(CorruptDataError) as err:
        for _ in zip(range(10), loader):
            pass
    assert "\n" not in str(err.value) and re.match(r"shard \S*train-000001\.tar: unreadable", str(err.value))


DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTIONS = ("data", "model", "diffusion", "train", "optimizer", "ema", "checkpoint", "logging", "preemption",
            "eval", "tracking")


def documented_overrides(doc: Path) -> list[str]:
    """Every code span of `doc` that is only key=value overrides, as a shell would pass them."""
    spans = re.findall(r"`([^`\n]+)`", doc.read_text())
    found = []
    for span in spans:
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        if words and all(re.match(rf"({'|'.join(SECTIONS)})\.\w+=", w) for w in words):
            found.append(span)
    return found


@pytest.mark.parametrize("doc", ["troubleshooting.md", "data.md"])
def test_documented_overrides_load_as_pasted_into_a_shell(doc):
    spans = documented_overrides(DOCS / doc)
    assert spans
    for span in spans:
        cfg = load_config(overrides=["data.shards=x", *shlex.split(span)])  # raises on an invalid override
        if "bpd_split" in span:
            assert cfg.eval.bpd_split in ("", "train"), span
    if doc == "troubleshooting.md":  # skipping bits/dim is documented, and works when pasted
        skips = [s for s in spans if "bpd_split" in s
                 and load_config(overrides=["data.shards=x", *shlex.split(s)]).eval.bpd_split == ""]
        assert skips
