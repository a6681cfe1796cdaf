"""The MLflow UI opens where our users work: the URL that evaluate and compare print, served by the ``mlflow ui``
command they print, shows in a real browser (headless Chromium, a fresh profile) the run's name and its metrics.

MLflow 3.17 opens an experiment on its GenAI overview (traces, latency, tokens: empty for training runs) and keeps
that choice in the browser's localStorage, so the printed URLs name the runs view or the run's page instead
(pipeline.tracking.sink.ui_hint). Screenshots are kept as test artifacts in $TEST_ARTIFACTS_DIR (default:
test-artifacts/ in the repository).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import trainer as h
from tests.helpers.browser import BrowserUnavailable, ensure_chromium, render
from tests.helpers.mlflow_server import free_port, serving

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", h.REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, str, str]:
    """A tracked training of 4 steps, evaluated: (the project folder, evaluate's output, compare's output)."""
    try:
        ensure_chromium()  # before the training: an install failure says so at once
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("ui")
    digits = h.prepare_digits(root / "digits")
    runs = root / "runs"
    r = h.run(h.train_cmd([f"data.shards={digits}", "tracking.enabled=true", "train.total_steps=4",
                           "checkpoint.every_steps=4", "name=ui-run", f"train.out_dir={runs / 'ui-run'}"],
                          script=h.LAUNCH), h.env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = h.run([h.PY, "-m", "evaluation.evaluate", "--checkpoint", str(runs / "ui-run"),
                "eval.feature_extractor=digits", "eval.num_samples=16", "eval.steps=2", "eval.batch_size=16",
                "eval.bpd_split=''", "eval.grid_images=4", "eval.device=cpu"], h.env())
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    cmp = h.run([h.PY, "-m", "evaluation.compare", "--tracking-uri", f"sqlite:///{runs / 'mlflow.db'}",
                 "--experiment", "ddpm", "--out", str(root / "compare")], h.env())
    assert cmp.returncode == 0, cmp.stdout[-2000:] + cmp.stderr[-2000:]
    return root, ev.stdout, cmp.stdout


def _printed(out: str) -> tuple[list[str], str]:
    """The `mlflow ui` command and the URL of a printed "MLflow UI: ..." hint."""
    m = re.search(r"MLflow UI: (.+ ui --backend-store-uri .+)\n\s*then open (http://127\.0\.0\.1:\d+/#/\S+)", out)
    assert m, out[-2000:]
    return shlex.split(m.group(1)), m.group(2)


def _served(cmd: list[str], url: str, log: Path):
    """The printed command, on a free port instead of 5000 (another UI may hold that one here), and the URL."""
    port = free_port()
    cmd = [*cmd[: cmd.index("--port") + 1], str(port), *cmd[cmd.index("--port") + 2:]]
    return serving(cmd, port, log), re.sub(r"^http://127\.0\.0\.1:\d+/", f"http://127.0.0.1:{port}/", url)


def test_evaluate_prints_the_runs_page_and_the_browser_shows_its_name_and_metrics(evaluated):
    root, ev_out, _ = evaluated
    cmd, url = _printed(ev_out)
    assert cmd[1:3] == ["ui", "--backend-store-uri"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}", url)
    server, url = _served(cmd, url, root / "ui.log")
    with server:
        dom = render(url, screenshot=ARTIFACTS / "mlflow-ui-run.png")
    assert "ui-run" in dom  # the run's name
    for metric in ("train/loss", "eval/fid_digits", "eval/digits_confident_share"):
        assert metric in dom, metric
    assert (ARTIFACTS / "mlflow-ui-run.png").stat().st_size > 10_000


def test_compare_prints_the_experiments_training_runs_and_the_browser_lists_the_run(evaluated):
    root, _, cmp_out = evaluated
    cmd, url = _printed(cmp_out)
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs", url)
    server, url = _served(cmd, url, root / "ui-compare.log")
    with server:
        dom = render(url, screenshot=ARTIFACTS / "mlflow-ui-runs.png")
    assert "ui-run" in dom
    assert (ARTIFACTS / "mlflow-ui-runs.png").stat().st_size > 10_000

