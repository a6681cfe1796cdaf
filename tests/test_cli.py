"""The one CLI frame (pipeline/cli.py): every input error of every layer is a ``cli.InputError`` (exit 2, one line),
anything else a failure (exit 1, the traceback); every command's --help comes from ``cli.HelpFormatter``; a real
bad input to each command exits 2 with one line that starts with the command's prefix."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

import pytest

from evaluation.errors import EvaluationError
from evaluation.features import InceptionWeightsUnavailable
from evaluation.fid import ReferenceStatsError
from pipeline import cli
from pipeline.checkpoint.folder import CheckpointError, NonFiniteWeightsError
from pipeline.config import ConfigError
from pipeline.data.manifest import ManifestError
from pipeline.data.prepare import PrepareError
from pipeline.data.remote import RemoteError
from pipeline.data.report import CorruptDataError, DataError
from pipeline.data.sources import SourceError
from pipeline.model.interop import InteropError
from pipeline.train.loop import NonFiniteLossError
from tests.helpers import trainer as h

REPO = Path(__file__).resolve().parent.parent

# every "fix the input" error, with the base it had before the frame (isinstance checks elsewhere rely on it)
INPUT_ERRORS = [
    (ConfigError, ValueError),  # pipeline/config.py
    (DataError, ValueError),  # pipeline/data/
    (ManifestError, DataError),
    (CorruptDataError, DataError),
    (RemoteError, OSError),
    (SourceError, ValueError),
    (PrepareError, RuntimeError),
    (InteropError, ValueError),  # pipeline/model/
    (CheckpointError, RuntimeError),  # pipeline/checkpoint/
    (EvaluationError, RuntimeError),  # evaluation/
    (ReferenceStatsError, ValueError),
    (InceptionWeightsUnavailable, RuntimeError),
]


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


# ------------------------------------------------------------------------------------------------ run()


@pytest.mark.parametrize("cls, base", INPUT_ERRORS, ids=lambda c: c.__name__)
def test_an_input_error_of_any_layer_exits_2_with_one_line(cls, base, capsys):
    assert issubclass(cls, cli.InputError) and issubclass(cls, base)
    assert cli.run("cmd", _raise(cls("the shards at /x are missing; run prepare"))) == cli.EXIT_INPUT == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "cmd: error: the shards at /x are missing; run prepare\n"


def test_on_input_error_runs_first_and_gives_the_line(capsys):
    seen: list[BaseException] = []

    def hook(exc: cli.InputError) -> str:
        seen.append(exc)
        return f"[rank 3] error: {exc}"

    exc = ConfigError("train.lr=-1 must be > 0")
    assert cli.run("train", _raise(exc), on_input_error=hook) == 2
    assert seen == [exc] and capsys.readouterr().err == "[rank 3] error: train.lr=-1 must be > 0\n"
    assert cli.run("train", lambda: 0, on_input_error=hook) == 0 and seen == [exc]  # not called on success


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory"), KeyError("a bug"),
                                 NonFiniteLossError("loss is nan"), NonFiniteWeightsError("weights are nan")],
                         ids=lambda e: type(e).__name__)
def test_any_other_exception_exits_1_with_its_traceback(exc, capsys):
    assert not isinstance(exc, cli.InputError)
    assert cli.run("cmd", _raise(exc)) == cli.EXIT_FAILURE == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and f"{type(exc).__name__}: " in err
    assert "cmd: error:" not in err


@pytest.mark.parametrize("code", [cli.EXIT_OK, cli.EXIT_PARTIAL, cli.EXIT_PREEMPTED, 7])
def test_the_body_decides_the_code_otherwise(code, capsys):
    assert cli.run("cmd", lambda: code) == code
    assert capsys.readouterr() == ("", "")


def test_the_codes_are_the_table_and_preemption_uses_it():
    from pipeline.train.preemption import PREEMPTED_EXIT_CODE

    assert (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_INPUT, cli.EXIT_PARTIAL, cli.EXIT_PREEMPTED) == (0, 1, 2, 3, 75)
    assert PREEMPTED_EXIT_CODE == cli.EXIT_PREEMPTED
    for code in (0, 1, 2, 3, 75):  # the one table, in the frame's docstring
        assert f"\n    {code:<3} " in cli.__doc__


# ------------------------------------------------------------------------------------------------ --help

COMMANDS = ["launch.train", "pipeline.data.prepare", "evaluation.evaluate", "evaluation.export",
            "evaluation.compare", "evaluation.pyfunc_model", "launch.demo", "evaluation.train_digits_net"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_commands_help_is_the_frames(module, monkeypatch, capsys):
    formatters: list[type] = []
    format_help = argparse.ArgumentParser.format_help

    def spy(self: argparse.ArgumentParser) -> str:
        formatters.append(self.formatter_class)
        return format_help(self)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", spy)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert formatters == [cli.HelpFormatter]
    assert "usage: " in capsys.readouterr().out


def test_help_wraps_at_whitespace_only_and_keeps_the_text_as_written(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    path = "/mnt/ci-check/sweep-runs/mlflow.db"
    example = "\n    python -m cmd --store S    # an example, indented as written\n"

    def help_lines(formatter_class: type | None) -> list[str]:
        p = cli.parser("cmd", f"First line.\n{example}")
        if formatter_class is not None:
            p.formatter_class = formatter_class
        p.add_argument("--store", default=path, help="the store that every run of the sweep logs into")
        p.add_argument("--off", default="", help="an empty default is not shown")
        return p.format_help().splitlines()

    lines = help_lines(None)
    assert any(line.strip() == f"{path})" for line in lines), lines  # wrapped before the path, not inside it
    assert not any("(default: )" in line for line in lines)
    assert example in "\n".join(lines) + "\n"
    # the test can tell: argparse's own formatter cuts the path at a hyphen, and refills the epilog
    lines = help_lines(argparse.ArgumentDefaultsHelpFormatter)
    assert not any(path in line for line in lines) and example not in "\n".join(lines)


# ------------------------------------------------------------------------------------------------ bad input

BAD_INPUTS = {  # command: (argv in tmp_path, the start of its one stderr line)
    "launch.train": (lambda t: ["--config", str(t / "missing.yaml")], "[rank 0] error: config file "),
    "pipeline.data.prepare": (lambda t: [str(t / "missing"), "--out", str(t / "out"), "--quiet"], "prepare: error: "),
    "evaluation.evaluate": (lambda t: ["--checkpoint", str(t / "missing")], "evaluate: error: "),
    "evaluation.export": (lambda t: [str(t / "missing"), "--diffusers", str(t / "hf")], "export: error: "),
    "evaluation.compare": (lambda t: ["--experiment", "x", "--tracking-uri", f"sqlite:///{t / 'missing' / 'm.db'}",
                                      "--out", str(t / "p")], "compare: error: "),
    "evaluation.pyfunc_model": (lambda t: [str(t / "missing")], "pyfunc_model: error: "),
    "launch.demo": (lambda t: ["--data", str(t / "broken")], "demo: error: "),
    "evaluation.train_digits_net": (lambda t: ["--data", str(t / "missing")], "train_digits_net: error: "),
}


@pytest.mark.parametrize("module", BAD_INPUTS)
def test_a_bad_input_to_each_command_exits_2_with_one_line(module, tmp_path, monkeypatch, capsys):
    argv, prefix = BAD_INPUTS[module]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")  # the demo prepares a missing folder: give it a bad one
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)  # restored afterwards: the demo changes into the repository
    sigterm = signal.getsignal(signal.SIGTERM)  # training ignores SIGTERM on an input error
    try:
        assert importlib.import_module(module).main(argv(tmp_path)) == 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    assert "missing" in lines[0] or "broken" in lines[0]  # it names what to fix


def test_every_command_is_checked_for_both():
    assert list(BAD_INPUTS) == COMMANDS


@pytest.mark.parametrize("cmd, prefix", [
    (["launch/train.py", "--config", "missing.yaml"], "[rank 0] error: config file "),
    (["-m", "pipeline.data.prepare", "missing", "--out", "out", "--quiet"], "prepare: error: "),
], ids=["train", "prepare"])
def test_the_scripts_exit_2_with_one_line(cmd, prefix, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = h.run([sys.executable, *(str(REPO / c) if c.endswith(".py") else c for c in cmd)],
              {**env, "PYTHONPATH": str(REPO)}, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr
