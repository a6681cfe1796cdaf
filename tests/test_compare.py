"""evaluation/compare.py on runs written into real sqlite MLflow stores."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from evaluation.compare import main, metric_keys, render_table
from tests.helpers import trainer as h

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(client: MlflowClient, exp_id: str, name: str, start_ms: int, *, params: dict, metrics: dict,
              tags: dict | None = None, status: str = "FINISHED") -> str:
    run = client.create_run(exp_id, start_time=start_ms, run_name=name)
    rid = run.info.run_id
    client.log_batch(
        rid,
        metrics=[Metric(k, v, start_ms + s, s) for k, pts in metrics.items() for s, v in pts],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
    client.set_terminated(rid, status=status)
    return rid


PROTO = {"extractor_sha256": "ab12", "mode": "clean", "reference": "shards:test", "reference_count": "360",
         "reference_sha256": "cd34", "num_samples": "1000", "sampler": "ddim", "sampler_steps": "50",
         "eta": "0.0", "weights": "ema"}


def _proto_tags(**changes) -> dict:
    return {f"fid_protocol.digits.{k}": v for k, v in (PROTO | changes).items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=str(root / "art"))
    common = {"model.base_channels": 64, "train.seed": 0}
    a = _make_run(
        client, exp, "a", 1_000,
        params=common | {"optimizer.lr": 0.0002, "train.batch_size": 128},
        metrics={"train/loss": [(0, 1.0), (100, 0.5), (200, 0.25)],
                 "train/images_per_s": [(100, 10.0), (200, 50.0), (300, 60.0)],
                 "eval/fid_digits": [(100, 30.0), (200, 12.5), (300, 14.25)],
                 "eval/bpd": [(300, 3.75)]},
        tags=_proto_tags(step="300"),
    )
    b = _make_run(
        client, exp, "b", 2_000,
        params=common | {"optimizer.lr": 0.0001, "train.batch_size": 64},
        metrics={"train/loss": [(0, 1.2), (300, 0.4)],
                 "train/images_per_s": [(100, 40.0)],
                 "eval/fid_digits": [(100, 20.0), (200, 25.0)]},
        tags=_proto_tags(num_samples="5000", step="200"),
        status="KILLED",
    )
    # a second experiment whose runs share one protocol, and one run without protocol tags
    same = client.create_experiment("same", artifact_location=str(root / "art2"))
    for i, name in enumerate(("c", "d")):
        _make_run(client, same, name, 3_000 + i, params={"optimizer.lr": 0.0001 * (i + 1)},
                  metrics={"eval/fid_digits": [(10, 5.0 + i)]}, tags=_proto_tags(step=str(10 + i)))
    unknown = client.create_experiment("unknown", artifact_location=str(root / "art3"))
    _make_run(client, unknown, "e", 5_000, params={}, metrics={"eval/fid_digits": [(10, 5.0)]},
              tags=_proto_tags())
    _make_run(client, unknown, "f", 6_000, params={}, metrics={"eval/fid_digits": [(10, 6.0)]})
    return {"uri": uri, "root": root, "a": a, "b": b}


def test_table_has_exact_values_and_only_differing_params(store, tmp_path, capsys):
    assert main(["--experiment", "cmp", "--tracking-uri", store["uri"], "--out", str(tmp_path / "plots")]) == 0
    out, err = capsys.readouterr()
    ia, ib = store["a"][:8], store["b"][:8]
    # a tie (one run each): the oldest run's protocol is the reference, the other row says what differs
    expected = "\n".join([
        "run  id        status    steps  optimizer.lr  train.batch_size  best eval/fid_digits  last eval/fid_digits  "
        "protocol                      bpd    img/s",
        "---  --------  --------  -----  ------------  ----------------  --------------------  --------------------  "
        "----------------------------  -----  -----",
        f"a    {ia}  FINISHED  200    0.0002        128               12.50 @200            14.25 @300            "
        "n=1000                        3.750  50.0",
        f"b    {ib}  KILLED    300    0.0001        64                20.00 @100            25.00 @200            "
        "n=5000, differs: num_samples  -      40.0",
    ])
    assert out.startswith(expected + "\n")
    assert "model.base_channels" not in out and "train.seed" not in out  # equal in both runs
    # the protocol warning names the differing field with each run's value, not the informational step
    warnings = [line for line in err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1
    assert "eval/fid_digits values of different protocols" in warnings[0]
    assert "num_samples: a=1000, b=5000" in warnings[0] and "step:" not in warnings[0]


def test_plots_are_valid_pngs(store, tmp_path, capsys):
    out_dir = tmp_path / "plots"
    assert main(["--experiment", "cmp", "--tracking-uri", store["uri"], "--out", str(out_dir)]) == 0
    stdout = capsys.readouterr().out
    for name in ("fid_vs_step.png", "loss_vs_step.png"):
        path = out_dir / name
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size == (700, 450)
        assert f"wrote {path}" in stdout


def test_no_warning_for_one_protocol_and_unknown_protocol_is_named(store, tmp_path, capsys):
    assert main(["--experiment", "same", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in err
    assert "best eval/fid_digits" in out and "optimizer.lr" in out
    assert "no train/loss was logged; loss_vs_step.png not written" in err
    assert not (tmp_path / "loss_vs_step.png").exists() and (tmp_path / "fid_vs_step.png").exists()

    assert main(["--experiment", "unknown", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "no fid_protocol.digits.* tags (protocol unknown): f" in err


def test_metric_selection():
    from evaluation.compare import RunSummary

    runs = [RunSummary("r1", "r1", "FINISHED", 0, {}, {},
                       latest={"eval/fid_digits": 1.0, "eval/fid_inception": 2.0, "fid/old": 3.0,
                               "eval/kid_digits": 0.1, "train/loss": 0.5})]
    # only the pipeline's eval/<metric>_<ext> family: fid/old was never logged by it
    assert metric_keys(runs, "fid") == {"eval/fid_digits": "digits", "eval/fid_inception": "inception"}
    assert metric_keys(runs, "eval/fid_inception") == {"eval/fid_inception": "inception"}
    assert metric_keys(runs, "kid") == {"eval/kid_digits": "digits"}
    assert metric_keys(runs, "is") == {}


def test_render_table_is_fixed_width():
    text = render_table(["a", "long header"], [["x" * 40, "1"], ["y", "22"]])
    lines = text.splitlines()
    assert lines[0] == "a" + " " * 31 + "  long header"
    assert lines[1] == "-" * 32 + "  " + "-" * 11
    assert lines[2] == "x" * 31 + "…  1"  # cells longer than 32 characters are cut


@pytest.mark.slow
def test_cli_merges_two_stores_and_rejects_an_unknown_experiment(store, tmp_path):
    # a second store: two demo trainings with the embedded default have one database each
    uri2 = f"sqlite:///{tmp_path / 'other.db'}"
    client = MlflowClient(uri2)
    exp = client.create_experiment("cmp", artifact_location=str(tmp_path / "art"))
    _make_run(client, exp, "z", 9_000, params={"optimizer.lr": 0.0003}, metrics={"train/loss": [(5, 2.0)]})
    cmd = [sys.executable, "-m", "evaluation.compare", "--experiment", "cmp", "--tracking-uri", store["uri"],
           "--tracking-uri", uri2, "--out", str(tmp_path / "p")]
    res = h.run(cmd, dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("\nwrote ", 1)[0]
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert rows == ["a", "b", "z"]  # oldest first, across both stores
    assert "0.0003" in res.stdout
    # the UI's training-runs view of the experiment, once per store, with its id in that store
    ui = re.findall(r"MLflow UI: .* ui --backend-store-uri (\S+) --host 127\.0\.0\.1 --port 5000\n\s+then open "
                    r"http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs\n", res.stdout)
    assert ui == [(store["uri"], MlflowClient(store["uri"]).get_experiment_by_name("cmp").experiment_id),
                  (uri2, exp)], res.stdout

    res = h.run([sys.executable, "-m", "evaluation.compare", "--experiment", "nope", "--tracking-uri", uri2],
                dict(os.environ), timeout=120)
    assert res.returncode == 2
    assert "no runs of experiment 'nope'" in res.stderr


def test_fid_plot_marks_runs_of_another_or_unknown_protocol(store, tmp_path):
    from evaluation.compare import compare, load_runs

    runs = load_runs(store["uri"], "cmp", 10)
    result = compare(runs, experiment="cmp", out_dir=tmp_path)
    # read back from the drawn axes: b (5000 samples, the tie's minority) is dashed and named so
    assert result.fid_lines == [("a", "-"), ("b (other protocol)", "--")]
    unknown = load_runs(store["uri"], "unknown", 10)
    result = compare(unknown, experiment="unknown", out_dir=tmp_path)
    assert result.fid_lines == [("e", "-"), ("f (protocol unknown)", ":")]
    assert "? (protocol unknown)" in result.table.splitlines()[3]


def test_majority_protocol_is_the_most_common_not_the_oldest(tmp_path):
    from evaluation.compare import compare, load_runs

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("m", artifact_location=str(tmp_path / "art"))
    for i, (n, ref) in enumerate([("500", "shards:test"), ("1000", "shards:test"), ("1000", "shards:test"),
                                  ("1000", "shards:train")]):
        _make_run(client, exp, f"r{i}", 1_000 + i, params={}, metrics={"eval/fid_digits": [(10, 5.0 + i)]},
                  tags=_proto_tags(num_samples=n, reference=ref))
    table = compare(load_runs(uri, "m", 10), experiment="m", out_dir=tmp_path).table
    start = table.splitlines()[0].index("protocol")
    cells = [line[start:].split("  ")[0] for line in table.splitlines()[2:]]
    assert cells == ["n=500, differs: num_samples", "n=1000", "n=1000", "n=1000, differs: reference"]


def test_a_missing_sqlite_store_is_refused_not_created(tmp_path, capsys):
    db = tmp_path / "nowhere" / "mlflow.db"
    assert main(["--experiment", "ddpm", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare: error: no MLflow store at ") and str(db) in err[0]
    assert not db.exists() and not db.parent.exists()  # MLflow was never asked: it would have created it


def test_default_store_is_runs_mlflow_db_under_the_current_folder(store, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", "cmp", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no MLflow store at {tmp_path / 'runs' / 'mlflow.db'}" in err[0]
    assert "--tracking-uri" in err[0] and "MLFLOW_TRACKING_URI" in err[0]
    assert not (tmp_path / "runs").exists()

    (tmp_path / "runs").mkdir()
    shutil.copy(store["root"] / "mlflow.db", tmp_path / "runs" / "mlflow.db")
    assert main(["--experiment", "cmp", "--out", str(tmp_path / "p")]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == ["a", "b"]
    # $MLFLOW_TRACKING_URI comes first, and is checked as well
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert main(["--experiment", "cmp", "--out", str(tmp_path / "p")]) == 2
    assert f"no MLflow store at {tmp_path / 'other.db'}" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: compare-out)" in out and "(default: fid)" in out and "(default: 200)" in out
    assert f"here sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}" in out
    assert "(default: None)" not in out
