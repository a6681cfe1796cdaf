"""The EMAs in real 2-process trainings (gloo on CPU): under DDP and DeepSpeed ZeRO-1/2/3, fp32 and bf16, the EMA
written to ema.safetensors at every step equals the previous implementation's EMA (tests/test_ema.py's
PreviousEMA: ema-pytorch, masked) of the fp32 weights the optimizer produced, step by step, a skipped
(non-finite) step included; so does a second classic EMA (ema.decays), and the two power-function EMAs
(ema.posthoc.sigma_rels) follow EDM2's beta_t = (1 - 1/t)^(gamma + 1) over the applied steps, their fp16
snapshots hard-linked into every later checkpoint. Under ZeRO they are kept partitioned like DeepSpeed's master
weights and gathered for each checkpoint and for the sample grid, so this is also the test of that gather. Under
ZeRO-2, which partitions the gradients, the skipped step also leaves Adam's moments and step count alone on both
ranks (the same launches serve both checks)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.folder import Checkpoint
from pipeline.checkpoint.posthoc import sigma_rel_to_gamma
from pipeline.config import EMAConfig
from pipeline.model.unet import UNet
from tests.helpers import trainer as h
from tests.test_ema import _previous

pytestmark = pytest.mark.slow

STEPS, NAN_AT = 5, 3
EMA_CFG = EMAConfig(decay=0.9, warmup_steps=1, update_every=1, power=0.75)  # one copy, then averaging
DECAY2, SIGMAS, SNAP_EVERY = 0.8, (0.05, 0.1), 2


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


def _master(ckpt, stage: int) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer holds after that step (DeepSpeed's master weights, or the DDP module)."""
    if stage:
        return h.deepspeed_fp32(ckpt)
    c = Checkpoint(ckpt)
    return c.raw_weights(set(UNet(c.config().model).state_dict()))


# Every EMA code path once: DDP (bf16 autocast leaves its fp32 module and so its EMA path alone), ZeRO-1 under
# bf16 (DeepSpeed's BF16_Optimizer; ZeRO-1 in fp32 is ZeRO-2's optimizer class), ZeRO-2 and ZeRO-3 in both.
@pytest.mark.parametrize(("stage", "precision"), [(0, "no"), (1, "bf16"), (2, "no"), (2, "bf16"), (3, "no"),
                                                  (3, "bf16")],
                         ids=lambda v: {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}.get(v, v))
def test_ema_equals_the_previous_implementation_of_the_optimizer_weights(digits, tmp_path, stage, precision):
    over = [f"data.shards={digits}", f"train.out_dir={tmp_path}", f"train.total_steps={STEPS}",
            "train.micro_batch_per_gpu=4", "checkpoint.every_steps=1", f"checkpoint.keep={STEPS}",
            f"ema.decay={EMA_CFG.decay}", f"ema.warmup_steps={EMA_CFG.warmup_steps}", f"ema.power={EMA_CFG.power}",
            "logging.sample_every_steps=4", "logging.sample_grid_images=2", "logging.sample_ddim_steps=2",
            f"ema.decays=[{DECAY2}]", f"ema.posthoc.sigma_rels=[{','.join(map(str, SIGMAS))}]",
            f"ema.posthoc.snapshot_every_steps={SNAP_EVERY}"]
    over += ["train.mixed_precision=bf16"] if precision == "bf16" else []  # "no" would be read as false
    environ = (h.launch_env(deepspeed=True, DDPM_FAULT_NAN_AT_STEP=str(NAN_AT)) if stage else
               h.launch_env(multi=True, DDPM_FAULT_NAN_AT_STEP=str(NAN_AT)))
    r = h.run(h.train_cmd(over, nproc=2, deepspeed_stage=stage, mixed_precision=precision), environ, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "non-finite 1" in r.stdout  # the NaN step was skipped (its tick says so)

    steps = {s: tmp_path / f"step-{s:08d}" for s in range(1, STEPS + 1)}
    master = {s: _master(p, stage) for s, p in steps.items()}
    assert h.same(master[NAN_AT], master[NAN_AT - 1]) and not h.same(master[NAN_AT + 1], master[NAN_AT])
    if precision == "bf16" and stage:  # the EMA must average the fp32 master weights, not their bf16 rounding
        assert any(not torch.equal(v, v.bfloat16().float()) for v in master[STEPS].values())
    if stage == 2:
        # ZeRO-2 partitions the gradients, so rank 0's NaN must be caught across ranks: the skipped step leaves the
        # Adam moments and step count alone on both ranks, the next one trains again (the EMAs: below).
        adam = {s: h.deepspeed_adam_state(steps[s]) for s in (NAN_AT - 1, NAN_AT, NAN_AT + 1)}
        assert h.same(adam[NAN_AT - 1], adam[NAN_AT]) and not h.same(adam[NAN_AT], adam[NAN_AT + 1])
        for rank in (0, 1):
            assert [adam[s][f"rank{rank}.0.step"].item() for s in adam] == [NAN_AT - 1, NAN_AT - 1, NAN_AT]
        assert all(torch.isfinite(v).all() for sd in (master[STEPS], adam[NAN_AT + 1]) for v in sd.values())

    live = UNet(Checkpoint(steps[1]).config().model)
    refs = {"ema.safetensors": _previous(live, EMA_CFG),
            f"ema-decay{DECAY2}.safetensors": _previous(live, EMAConfig(**{**vars(EMA_CFG), "decay": DECAY2}))}
    power = {f"ema-sigma{s}.safetensors": (sigma_rel_to_gamma(s), None) for s in SIGMAS}  # float64 references
    t = 0
    for s in range(1, STEPS + 1):
        live.load_state_dict(master[s])
        applied = s != NAN_AT
        for file, ref in refs.items():
            ref.masked_update(torch.tensor(1.0 if applied else 0.0))
            got, want = load_file(str(steps[s] / file)), ref.ema_model.state_dict()
            assert got.keys() == want.keys() and all(v.dtype == torch.float32 for v in got.values())
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            assert not bad, f"step {s} {file}: {len(bad)} differ, e.g. {bad[0]} by {h.max_diff(got, want):.3g}"
        t += applied
        for file, (g, ref) in power.items():
            if applied:
                w = 1.0 - (1.0 - 1.0 / t) ** (g + 1)
                ref = {k: (1 - w) * ref[k] + w * v.double() for k, v in master[s].items()} if ref else {
                    k: v.double() for k, v in master[s].items()}
                power[file] = (g, ref)
            got = load_file(str(steps[s] / file))
            assert max((got[k].double() - ref[k]).abs().max().item() for k in ref) < 1e-6, (s, file)
            if s % SNAP_EVERY == 0:  # its snapshot: the EMA of that step in fp16, in every later checkpoint
                rel = f"posthoc/sigma{file[len('ema-sigma'):-len('.safetensors')]}-step{s:08d}.safetensors"
                snap = load_file(str(steps[s] / rel))
                assert all(torch.equal(snap[k], got[k].half()) for k in got)
                assert all(os.path.samefile(steps[s] / rel, steps[later] / rel) for later in range(s, STEPS + 1))
    assert not h.same(h.ema(steps[STEPS]), master[STEPS])  # a real average, not a copy of the weights
    assert Checkpoint(steps[STEPS]).verify() == []
