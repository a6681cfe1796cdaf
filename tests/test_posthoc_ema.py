"""Post-hoc EMA (pipeline/checkpoint/posthoc.py, EDM2): the algebra against ema-pytorch's solver and direct integration,
the synthesis against an EMA that was really kept, the classic EMAs' sigma_rel against their schedule; then real
trainings: snapshots written once and hard-linked into every later checkpoint (keep-k, sha256), a stored sigma_rel
synthesized back, a kill -9 resume bitwise for every EMA and snapshot, an EMA added mid-run refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma as lucidrains_gamma
from ema_pytorch.post_hoc_ema import solve_weights as lucidrains_solve
from safetensors.torch import load_file

from pipeline.checkpoint import posthoc as ph
from pipeline.checkpoint import weights
from pipeline.checkpoint.folder import Checkpoint, CheckpointError
from pipeline.checkpoint.posthoc import sigma_rel_to_gamma
from pipeline.config import EMAConfig, PostHocConfig
from pipeline.train.ema import EMA
from tests.helpers import trainer as h

# ---- the algebra ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.25, 0.28])
def test_gamma_of_sigma_rel_is_ema_pytorchs_and_eq4_inverts_it(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(lucidrains_gamma(sigma_rel), rel=1e-12) and g > 0
    assert ph.gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-10)


def test_profile_inner_products_equal_numerical_integration():
    """<p_a, p_b> for p_t(tau) = (g + 1) tau^g / t^(g + 1) on [0, t], integrated on a fine grid."""
    for (ta, ga), (tb, gb) in [((100.0, 6.94), (60.0, 16.97)), ((40.0, 2.0), (100.0, 2.0)), ((80.0, 1.5), (80.0, 30.0))]:
        x = np.linspace(0, max(ta, tb), 2_000_001)[1:]
        pa = np.where(x <= ta, (ga + 1) * x ** ga / ta ** (ga + 1), 0.0)
        pb = np.where(x <= tb, (gb + 1) * x ** gb / tb ** (gb + 1), 0.0)
        numeric = float(np.sum(pa * pb) * (x[1] - x[0]))
        assert ph.power_function_correlation(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_coefficients_equal_ema_pytorchs_solver():
    rng = np.random.default_rng(0)
    t_in = np.repeat(np.arange(10, 210, 20), 2).astype(float)
    g_in = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)], len(t_in) // 2)
    targets = [sigma_rel_to_gamma(s) for s in (0.03, 0.07, 0.12, 0.2)]
    ours = ph.solve_posthoc_coefficients(t_in, g_in, [200.0] * 4, targets)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    theirs = lucidrains_solve(f64(t_in), f64(g_in), f64([200.0] * 4), f64(targets)).numpy()
    np.testing.assert_allclose(ours, theirs / theirs.sum(axis=0), rtol=1e-8, atol=1e-10)
    assert np.allclose(ours.sum(axis=0), 1.0)
    # a target equal to an input profile is that input alone
    i = int(rng.integers(len(t_in)))
    x = ph.solve_posthoc_coefficients(t_in, g_in, [t_in[i]], [g_in[i]])[:, 0]
    assert x[i] == pytest.approx(1.0, abs=1e-9) and np.abs(np.delete(x, i)).max() < 1e-9


def _trajectory(steps: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A drifting, noisy weight trajectory (what SGD does to a weight: a trend plus noise)."""
    g = torch.Generator().manual_seed(seed)
    trend = torch.cumsum(torch.randn(steps, dim, generator=g) * 0.02, 0) + torch.linspace(0, 1, steps)[:, None]
    return trend + torch.randn(steps, dim, generator=g) * 0.3


def test_synthesis_reconstructs_a_power_ema_that_was_really_kept():
    """Three power EMAs on one trajectory (200 steps, snapshots every 10): the sigma_rel 0.075 one rebuilt from the
    0.05 and 0.10 ones' snapshots is far closer to it than either stored EMA is."""
    steps, dim, every = 200, 64, 10
    traj = _trajectory(steps, dim)
    live = torch.nn.Linear(dim, 1, bias=False)
    bank = EMA(live, EMAConfig(decay=0.9, posthoc=PostHocConfig(sigma_rels=[0.05, 0.1, 0.075])))
    snaps = []  # (t, gamma, weights)
    for s in range(steps):
        with torch.no_grad():
            live.weight.copy_(traj[s][None])
        bank.update(torch.tensor(1.0))
        if (s + 1) % every == 0:
            for sigma in (0.05, 0.1):
                snaps.append((s + 1, sigma_rel_to_gamma(sigma), bank.weights(f"sigma{sigma!r}")["weight"].double()))
    x = ph.solve_posthoc_coefficients([t for t, _, _ in snaps], [g for _, g, _ in snaps], [steps],
                                      [sigma_rel_to_gamma(0.075)])[:, 0]
    rebuilt = sum(float(c) * w for c, (_, _, w) in zip(x, snaps))
    truth = bank.weights("sigma0.075")["weight"].double()
    err = (rebuilt - truth).abs().max().item()
    nearest = min((bank.weights(n)["weight"].double() - truth).abs().max().item() for n in ("sigma0.05", "sigma0.1"))
    assert err < nearest / 20, (err, nearest)


def test_classic_coefficients_are_the_schedule_the_ema_runs():
    """The coefficients classic_sigma_rel reads equal the weights a classic EMA really gives each step (one-hot
    live weights), for ema-pytorch's warm-up and for the plain schedule."""
    n = 30
    for cfg in (EMAConfig(decay=0.9, warmup_steps=3, update_every=2, power=0.75), EMAConfig(decay=0.8, warmup="none")):
        live = torch.nn.Linear(n, 1, bias=False)
        ema = EMA(live, cfg)
        for s in range(n):
            with torch.no_grad():
                live.weight.zero_()
                live.weight[0, s] = 1.0
            ema.update(torch.tensor(1.0))
        got = ema.weights()["weight"][0].double().numpy()
        np.testing.assert_allclose(got, ph.classic_coefficients(cfg, cfg.decay, n), rtol=1e-5, atol=1e-7)


def test_sigma_rel_of_profiles():
    """A power EMA's discrete profile has its sigma_rel; a constant decay beta after t steps has
    sqrt(beta) / (1 - beta) / t (the geometric profile's standard deviation)."""
    for sigma in (0.05, 0.1, 0.2):
        g, t = sigma_rel_to_gamma(sigma), 5000
        tau = np.arange(1, t + 1, dtype=np.float64)
        coef = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
        assert ph.profile_sigma_rel(coef) == pytest.approx(sigma, rel=1e-3)
    beta, t = 0.999, 100_000
    cfg = EMAConfig(decay=beta, warmup="none")
    assert ph.classic_sigma_rel(cfg, beta, t) == pytest.approx(math.sqrt(beta) / (1 - beta) / t, rel=1e-3)
    # ema-pytorch's warm-up narrows the profile: less than the constant decay's
    assert ph.classic_sigma_rel(EMAConfig(decay=beta, power=0.75), beta, 2000) < ph.classic_sigma_rel(cfg, beta, 2000)


def test_sweep_specs():
    assert ph.parse_sigma_rels("0.03:0.20:8") == [0.03, 0.0393, 0.0516, 0.0676, 0.0887, 0.116, 0.153, 0.2]
    assert ph.parse_sigma_rels("0.1,0.05,0.1") == [0.05, 0.1]
    for bad in ("0.03:0.2", "0.2:0.03:4", "0:0.1:3", "0.05,0.3", "x", ""):
        with pytest.raises(ValueError, match="--posthoc-sigma-rels"):
            ph.parse_sigma_rels(bad)


# ---- real trainings ------------------------------------------------------------------------------------------

STEPS, NAN_AT, EVERY, SNAP_EVERY, KEEP = 10, 5, 3, 2, 2
POSTHOC = ["ema.decays=[0.8]", "ema.posthoc.sigma_rels=[0.05,0.1]", f"ema.posthoc.snapshot_every_steps={SNAP_EVERY}"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


def _cmd(shards, out, extra=()) -> list[str]:
    return h.train_cmd([f"data.shards={shards}", f"train.out_dir={out}", f"train.total_steps={STEPS}",
                        f"checkpoint.every_steps={EVERY}", f"checkpoint.keep={KEEP}", *POSTHOC, *extra])


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """10 steps, the 5th skipped (NaN); checkpoints every 3 steps and at every snapshot step (2), keep 2."""
    out = tmp_path_factory.mktemp("posthoc") / "run"
    r = h.run(_cmd(shards, out), h.env(DDPM_FAULT_NAN_AT_STEP=str(NAN_AT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _sha(ckpt) -> dict[str, str]:
    return json.loads((ckpt / "meta.json").read_text())["sha256"]


@pytest.mark.slow
def test_snapshots_are_written_once_and_linked_into_every_later_checkpoint(run):
    assert h.complete_steps(run) == [9, 10]  # 2, 3, 4, 6, 8 pruned by keep-k
    last, prev = run / "step-00000010", run / "step-00000009"
    snaps = {s: {sig: f"posthoc/sigma{sig}-step{s:08d}.safetensors" for sig in (0.05, 0.1)} for s in (2, 4, 6, 8, 10)}
    want = sorted(f for by in snaps.values() for f in by.values())
    assert sorted(str(p.relative_to(last)) for p in (last / "posthoc").iterdir()) == want
    assert sorted(str(p.relative_to(prev)) for p in (prev / "posthoc").iterdir()) == sorted(
        f for s, by in snaps.items() if s <= 8 for f in by.values())
    for s in (2, 4, 6, 8):  # one file on disk, in both folders (its first folder was pruned)
        for rel in snaps[s].values():
            assert os.path.samefile(last / rel, prev / rel)
    # t counts applied steps: step 5 was skipped
    applied = {2: 2, 4: 4, 6: 5, 8: 7, 10: 9}
    for s, by in snaps.items():
        for sig, rel in by.items():
            meta = ph.file_metadata(last / rel)
            assert (meta["t"], meta["step"], meta["sigma_rel"], meta["dtype"]) == (applied[s], s, sig, "fp16")
            assert all(v.dtype == torch.float16 for v in load_file(str(last / rel)).values())
    # the snapshot of step 10 is the power EMA of step 10, rounded to fp16
    stored = load_file(str(last / "ema-sigma0.05.safetensors"))
    snap = load_file(str(last / snaps[10][0.05]))
    assert all(torch.equal(snap[k], stored[k].half()) for k in stored)
    # sealed: meta.json records every snapshot, and the files verify
    assert set(want) <= set(_sha(last)) and Checkpoint(last).verify() == [] and Checkpoint(prev).verify() == []
    assert Checkpoint(last).ema_names() == ["", "decay0.8", "sigma0.05", "sigma0.1"]


@pytest.mark.slow
def test_a_stored_sigma_rel_synthesized_back_is_the_stored_ema(run):
    ckpt = Checkpoint(run / "step-00000010")
    out = ph.synthesize(ckpt, [0.05, 0.1, 0.07])
    for name in ("sigma0.05", "sigma0.1"):
        stored = ckpt.ema_weights(name)
        worst = max(((out[name][k] - v).abs().max() / v.abs().max().clamp(min=1e-12)).item() for k, v in stored.items())
        assert worst <= 2 ** -11, (name, worst)  # within fp16's precision (the snapshots' dtype)
    # an intermediate length is a new EMA, between the two stored ones
    a, b, mid = (torch.cat([w[k].reshape(-1) for k in sorted(w)]) for w in (out["sigma0.05"], out["sigma0.1"],
                                                                              out["sigma0.07"]))
    assert 0 < (mid - a).norm() < (b - a).norm() and 0 < (mid - b).norm() < (b - a).norm()
    # the one selection function gives the same weights for every kind of name
    assert h.same(weights.ema_weights(ckpt, "sigma0.07"), out["sigma0.07"])
    assert h.same(weights.ema_weights(ckpt, "decay0.8"), ckpt.ema_weights("decay0.8"))
    assert h.same(weights.ema_weights(ckpt, "decay0.9"), ckpt.ema_weights()) and h.same(weights.ema_weights(ckpt), ckpt.ema_weights())
    with pytest.raises(CheckpointError, match="has no EMA 'decay0.5'; it has decay0.9, decay0.8, sigma0.05, sigma0.1"):
        weights.ema_weights(ckpt, "decay0.5")


@pytest.mark.slow
def test_a_damaged_snapshot_is_named_and_not_used(run, tmp_path):
    copy = tmp_path / "step-00000010"
    shutil.copytree(run / "step-00000010", copy)
    rel = "posthoc/sigma0.1-step00000004.safetensors"
    data = bytearray((copy / rel).read_bytes())
    data[-1] ^= 0x01
    (copy / rel).write_bytes(bytes(data))
    assert any(rel in p for p in Checkpoint(copy).verify())
    with pytest.raises(CheckpointError, match=rel):
        weights.ema_weights(Checkpoint(copy), "sigma0.07")
    assert h.same(weights.ema_weights(Checkpoint(copy), "sigma0.1"), Checkpoint(copy).ema_weights("sigma0.1"))


@pytest.mark.slow
def test_kill_9_and_resume_gives_every_ema_and_snapshot_bitwise(run, shards, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(shards, out)
    environ = h.env(DDPM_FAULT_NAN_AT_STEP=str(NAN_AT))
    log = tmp_path / "killed.log"
    proc = h.start(cmd, {**environ, "DDPM_FAULT_STALL_AFTER_STEP": "6"}, log)
    # the stall line follows checkpoint 6 and its keep-k pruning (COMPLETE alone can precede the pruning)
    h.wait_for(lambda: "stalling after step 6" in log.read_text(), 240, proc, "checkpoint 6")
    h.kill_group(proc, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert h.complete_steps(out) == [4, 6]
    r = h.run(cmd, environ)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'step-00000006'} at step 6" in r.stdout
    for step in (9, 10):
        a, b = run / f"step-{step:08d}", out / f"step-{step:08d}"
        emas = sorted(k for k in _sha(a) if k.startswith(("ema", "posthoc/")))
        assert len(emas) == 4 + 2 * (step // SNAP_EVERY)
        assert emas == sorted(k for k in _sha(b) if k.startswith(("ema", "posthoc/")))
        for rel in emas:  # tensors and metadata (the files' bytes are not: safetensors orders its header freely)
            assert h.same(load_file(str(a / rel)), load_file(str(b / rel))), rel
            assert ph.file_metadata(a / rel) == ph.file_metadata(b / rel), rel
        assert h.same(h.params(a), h.params(b))
    assert Checkpoint(out / "step-00000010").verify() == []


@pytest.mark.slow
def test_an_ema_added_to_a_run_in_progress_is_refused(run, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    extra = ["ema.posthoc.sigma_rels=[0.05,0.1,0.2]", f"train.total_steps={STEPS + 2}"]
    r = h.run(_cmd(shards, out, extra), h.env())
    assert r.returncode == 2, r.stderr[-3000:]
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert "holds no ema-sigma0.2" in last and "start a new run" in last


@pytest.mark.slow
def test_a_synthesized_ema_exports_to_diffusers_with_its_own_weights(run, tmp_path, capsys):
    """export --weights takes any EMA name evaluate's --ema takes; the diffusers UNet holds exactly those weights."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    from evaluation import export
    from pipeline.model import interop

    ckpt = Checkpoint(run / "step-00000010")
    for name in ("sigma0.07", "decay0.8"):
        out = tmp_path / name
        assert export.main([str(ckpt.path), "--diffusers", str(out), "--weights", name]) == 0, capsys.readouterr().err
        assert json.loads((out / export.EXPORT_RECORD).read_text())["weights"] == name
        theirs = UNet2DModel.from_pretrained(str(out / "unet")).state_dict()
        assert h.same(interop.from_diffusers(theirs, weights.load_unet(ckpt, name).model), weights.ema_weights(ckpt, name))
    assert export.main([str(ckpt.path), "--diffusers", str(tmp_path / "x"), "--weights", "decay0.5"]) == 2
    err = capsys.readouterr().err
    assert "--weights decay0.5: not one of ema, raw nor an EMA" in err and "decay0.8, sigma0.05, sigma0.1" in err
