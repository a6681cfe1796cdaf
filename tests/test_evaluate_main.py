"""evaluate's command line: bad input exits 2 with one line; anything else exits 1 with the traceback."""

from __future__ import annotations

import pytest

import evaluation.evaluate
from evaluation.evaluate import main
from tests.helpers.evaluation import tiny_config, write_checkpoint


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
    return lines[0]


def test_input_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2  # EvaluationError
    assert "no such folder" in _one_error_line(capsys.readouterr().err)

    ckpt = write_checkpoint(tiny_config(str(tmp_path / "shards"), tmp_path / "run"), 10)
    assert main(["--checkpoint", str(ckpt), "eval.no_such_key=1"]) == 2  # ConfigError
    assert "eval.no_such_key" in _one_error_line(capsys.readouterr().err)

    ledger = tmp_path / "ledger.json"
    ledger.write_text("{")
    assert main(["--watch", str(tmp_path / "run"), "--once", "--ledger", str(ledger)]) == 2
    assert "not valid JSON" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory"), ValueError("a bug")])
def test_unexpected_errors_exit_1_with_the_traceback(tmp_path, capsys, monkeypatch, exc):
    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr(evaluation.evaluate, "evaluate", failing)
    assert main(["--checkpoint", str(tmp_path / "any")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}: {exc}" in err
    assert "evaluate: error:" not in err

    # the same through --watch: the checkpoint is still there, so the watcher stops and says why
    write_checkpoint(tiny_config(str(tmp_path / "shards"), tmp_path / "run"), 10)
    assert main(["--watch", str(tmp_path / "run"), "--once"]) == 1
    assert f"{type(exc).__name__}: {exc}" in capsys.readouterr().err
