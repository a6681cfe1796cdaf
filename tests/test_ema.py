"""The EMA (pipeline/train/ema.py): bit-for-bit the implementation it replaced, with no host sync; several EMAs in one
bank (each classic one still ema-pytorch's to the bit, the plain schedule, EDM2's power-function profile); the ZeRO
layout's partition <-> state_dict mapping (pipeline/train/ema_deepspeed.py). The 2-process runs are in
tests/test_ema_dist.py, post-hoc synthesis and snapshots in tests/test_posthoc_ema.py."""

from __future__ import annotations

import math

import pytest
import torch
from ema_pytorch import EMA as LucidrainsEMA
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.checkpoint.posthoc import sigma_rel_to_gamma
from pipeline.config import EMAConfig, PostHocConfig
from pipeline.train.ema import EMA, EMASchedule
from pipeline.train.ema_deepspeed import ZeroLayout, _Group, _Param


class PreviousEMA(LucidrainsEMA):
    """The EMA before the no-sync rewrite (commit 4e7a3f0, pipeline/train/ema.py's _MaskedEMA): ema-pytorch whose lerp weight is multiplied by a
    device tensor ``ok``; ema-pytorch then reads that weight with ``.item()``. The reference for bitwise equality."""

    _ok: torch.Tensor | None = None

    def get_current_decay(self):
        decay = super().get_current_decay()
        return decay if self._ok is None else 1.0 - (1.0 - decay) * self._ok

    def masked_update(self, ok: torch.Tensor) -> None:
        self._ok = ok
        try:
            self.update()
        finally:
            self._ok = None


def _previous(net: torch.nn.Module, cfg: EMAConfig) -> PreviousEMA:
    ref = PreviousEMA(net, beta=cfg.decay, update_after_step=cfg.warmup_steps, update_every=cfg.update_every,
                      power=cfg.power, include_online_model=False, use_foreach=True)
    ref.ema_model.float().requires_grad_(False)
    return ref


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # a BatchNorm: float buffers are averaged too (ema-pytorch's behaviour)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 5))


CONFIGS = [
    EMAConfig(decay=0.9999, warmup_steps=0, update_every=1, power=0.75),
    EMAConfig(decay=0.9, warmup_steps=3, update_every=1, power=2 / 3),
    EMAConfig(decay=0.95, warmup_steps=2, update_every=3, power=0.5),  # power 0.5: torch's rsqrt special case
    EMAConfig(decay=0.0, warmup_steps=0, update_every=1, power=1.0),  # decay 0: the EMA is the weights
    EMAConfig(decay=1.0, warmup_steps=1, update_every=1, power=0.75),  # decay 1: frozen after the copies
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c.decay}-w{c.warmup_steps}-e{c.update_every}-p{c.power:.2f}")
def test_weights_equal_the_previous_implementation_bitwise_with_skipped_steps(cfg):
    """40 updates of weights that keep moving (also on masked steps, the harder case), every 4th masked."""
    live, ref_live = _net(), _net()
    ours, ref = EMA(live, cfg), _previous(ref_live, cfg)
    gen = torch.Generator().manual_seed(1)
    for i in range(40):
        with torch.no_grad():
            for p, q in zip([*live.parameters(), *live.buffers()], [*ref_live.parameters(), *ref_live.buffers()]):
                if p.is_floating_point():
                    delta = torch.randn(p.shape, generator=gen) * 0.1
                    p.add_(delta)
                    q.add_(delta)
        ok = torch.tensor(0.0 if i % 4 == 3 else 1.0)
        ours.update(ok)
        ref.masked_update(ok)
        got, want = ours.weights(), ref.ema_model.state_dict()
        assert got.keys() == want.keys()
        bad = [k for k in got if not torch.equal(got[k], want[k].float())]
        assert not bad, f"update {i + 1}: {bad[:3]} differ"
        assert ours.num_updates == int(ref.step) and ours.schedule.initted == bool(ref.initted)


def test_masked_update_leaves_the_ema_unchanged_outside_the_copy_phase():
    live = _net()
    ema = EMA(live, EMAConfig(decay=0.99, warmup_steps=1, update_every=1, power=0.75))
    for _ in range(4):
        ema.update(torch.tensor(1.0))
    before = {k: v.clone() for k, v in ema.weights().items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(100.0)
    ema.update(torch.tensor(0.0))
    assert all(torch.equal(before[k], v) for k, v in ema.weights().items())
    ema.update(torch.tensor(1.0))
    assert not all(torch.equal(before[k], v) for k, v in ema.weights().items())
    assert ema.num_updates == 6


@pytest.mark.parametrize("power", [0.75, 2 / 3, 0.5, 1.0, 2.0, 0.123])
@pytest.mark.parametrize("beta", [0.9999, 0.995, 0.0])
def test_schedule_weight_equals_ema_pytorch_for_every_count(power, beta):
    """The host-side weight for n = 1..3000 (and far out, where the decay is capped) equals the one the previous
    implementation computed on tensors, to the bit."""
    warmup = 2
    ref = _previous(torch.nn.Linear(1, 1), EMAConfig(decay=beta, warmup_steps=warmup, update_every=1, power=power))
    sched = EMASchedule(EMAConfig(decay=beta, warmup_steps=warmup, update_every=1, power=power))
    one = torch.tensor(1.0)
    for n in [*range(1, 3000), 10**5, 10**6, 10**7]:
        ref.step.fill_(n)
        ref._ok = one
        want = float(1.0 - ref.get_current_decay())
        assert sched.weight(n) == want, n


class _CountScalarReads(TorchDispatchMode):
    """Counts aten::_local_scalar_dense: what .item(), float(t), bool(t) run (a host sync on a device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_update_reads_nothing_back_from_the_tensors():
    cfg = EMAConfig(decay=0.999, warmup_steps=2, update_every=1, power=0.75)
    ours, ref = EMA(_net(), cfg), _previous(_net(), cfg)
    with _CountScalarReads() as mode:
        for i in range(10):
            ours.update(torch.tensor(float(i % 3 != 0)))
    assert mode.count == 0
    with _CountScalarReads() as mode:  # the probe sees what the previous implementation did: syncs every update
        for i in range(10):
            ref.masked_update(torch.tensor(float(i % 3 != 0)))
    assert mode.count >= 10


def test_state_roundtrip_keeps_counters_and_weights():
    cfg = EMAConfig(decay=0.9, warmup_steps=2, update_every=1, power=0.75)
    a = EMA(_net(), cfg)
    for _ in range(5):
        a.update(torch.tensor(1.0))
    state = a.state_dict()
    assert set(state) == {"weights", "num_updates", "initted"} and state["num_updates"] == 5 and state["initted"]
    b = EMA(_net(1), cfg)
    b.load_state_dict(state)
    assert b.num_updates == 5 and b.schedule.weight(6) == a.schedule.weight(6)
    assert all(torch.equal(b.weights()[k], v) for k, v in a.weights().items())


# ---- the ZeRO layout: partitions <-> U-Net state_dict ------------------------------------------------------


def _fake_layout(params: list[_Param], world: int, rank: int, numel: int) -> ZeroLayout:
    layout = object.__new__(ZeroLayout)
    layout.stage = 3 if params[0].piece else 2
    layout.groups = (_Group(torch.zeros(numel), None, world, rank, tuple(params)),)
    return layout


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, 3, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(5, 7, generator=g)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zero12_layout_scatter_then_assemble_is_the_identity(world):
    """Flat buffer with alignment padding between parameters and at the end, cut into equal partitions."""
    w = _weights()
    params, offset = [], 0
    for name, t in w.items():
        params.append(_Param(name, t.shape, t.numel(), offset, 0))
        offset += t.numel() + 3  # padding after each parameter
    n = math.ceil(offset / world)
    rows, real = [], 0
    for rank in range(world):
        layout = _fake_layout(params, world, rank, n)
        flat = torch.full((n,), float("nan"))
        layout.scatter(w, [flat])
        rows.append(flat)
        real += sum(v.numel() for v in layout.real([flat]))
    got = layout.assemble([torch.stack(rows)])
    assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)
    assert all(torch.isfinite(r).all() for r in rows)  # padding is written (0), never left as it was
    assert real == sum(t.numel() for t in w.values())  # real(): the weights, without the padding


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_zero3_layout_scatter_then_assemble_is_the_identity(world):
    """Each parameter split in ``world`` pieces of ceil(numel / world) (the last padded), pieces concatenated."""
    w = _weights()
    params, offset = [], 0
    for name, t in w.items():
        piece = math.ceil(t.numel() / world)
        params.append(_Param(name, t.shape, t.numel(), offset, piece))
        offset += piece
    rows, real = [], []
    for rank in range(world):
        layout = _fake_layout(params, world, rank, offset)
        flat = torch.full((offset,), float("nan"))
        layout.scatter(w, [flat])
        rows.append(flat)
        real += layout.real([flat])
    got = layout.assemble([torch.stack(rows)])
    assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)
    assert all(torch.isfinite(r).all() for r in rows)
    assert sorted(torch.cat(real).tolist()) == sorted(torch.cat([t.reshape(-1) for t in w.values()]).tolist())


def test_scatter_refuses_a_state_without_every_parameter():
    w = _weights()
    layout = _fake_layout([_Param(k, t.shape, t.numel(), 0, 0) for k, t in w.items()], 1, 0, 200)
    del w["b.weight"]
    with pytest.raises(KeyError, match="b.weight"):
        layout.scatter(w, [torch.zeros(200)])


# ---- several EMAs at once: classic decays, the plain (no warm-up) schedule, power-function EMAs -------------


def _moving(live: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in [*live.parameters(), *live.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)


def test_every_classic_ema_of_a_bank_equals_its_own_previous_implementation_bitwise():
    """One bank (primary 0.99 + decays 0.9 and 0.95 + two power EMAs, all in one lerp) against three separate
    ema-pytorch EMAs, masked steps included: each row to the bit."""
    base = EMAConfig(decay=0.99, warmup_steps=2, update_every=1, power=0.75)
    cfg = EMAConfig(decay=0.99, warmup_steps=2, update_every=1, power=0.75, decays=[0.9, 0.95],
                    posthoc=PostHocConfig(sigma_rels=[0.05, 0.1]))
    live = _net()
    bank = EMA(live, cfg)
    refs = {name: _previous(live, EMAConfig(**{**vars(base), "decay": d}))
            for name, d in (("", 0.99), ("decay0.9", 0.9), ("decay0.95", 0.95))}
    gen = torch.Generator().manual_seed(2)
    for i in range(30):
        _moving(live, gen)
        ok = torch.tensor(0.0 if i % 5 == 4 else 1.0)
        bank.update(ok)
        for name, ref in refs.items():
            ref.masked_update(ok)
            got, want = bank.weights(name), ref.ema_model.state_dict()
            bad = [k for k in want if not torch.equal(got[k], want[k].float())]
            assert not bad, f"update {i + 1}, EMA {name or 'primary'}: {bad[:3]} differ"
    assert bank.names == ["", "decay0.9", "decay0.95", "sigma0.05", "sigma0.1"]


def test_plain_schedule_copies_once_then_keeps_the_constant_decay():
    """ema.warmup=none (the authors' EMA): a copy at the first update, then e <- decay e + (1 - decay) w with the
    constant decay, against a float64 loop; a masked step changes nothing."""
    decay = 0.9
    cfg = EMAConfig(decay=decay, warmup="none")
    live = _net()
    ema = EMA(live, cfg)
    gen = torch.Generator().manual_seed(3)
    ref: dict[str, torch.Tensor] = {}
    weights = set()
    for i in range(25):
        _moving(live, gen)
        ok = i % 6 != 5
        ema.update(torch.tensor(float(ok)))
        now = {k: v.double() for k, v in live.state_dict().items() if v.is_floating_point()}
        if i == 0:
            ref = {k: v.clone() for k, v in now.items()}
            assert all(torch.equal(ema.weights()[k], v.float()) for k, v in now.items())  # the copy, exact
        elif ok:
            ref = {k: decay * ref[k] + (1 - decay) * now[k] for k in ref}
        if i:
            weights.add(ema.schedule.weight(ema.num_updates))
        got = ema.weights()
        assert max((got[k].double() - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert weights == {float(torch.tensor(1.0) - torch.tensor(decay, dtype=torch.float32))}  # no warm-up ramp


class _Line(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_averages_with_edm2s_profile_and_a_skipped_step_is_not_on_its_time_axis(sigma_rel):
    """Live weights = the one-hot vector of the applied step, so the EMA row is its profile: the weight of applied
    step tau after t applied steps is (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1) (EDM2's p_t integrated over the step).
    Skipped steps (live weights poisoned meanwhile) leave it unchanged and do not advance t."""
    n = 40
    live = _Line(n)
    bank = EMA(live, EMAConfig(decay=0.5, posthoc=PostHocConfig(sigma_rels=[sigma_rel])))
    g = sigma_rel_to_gamma(sigma_rel)
    t = 0
    for i in range(n + 8):
        ok = i % 6 != 3
        with torch.no_grad():
            live.w.zero_()
            if ok:
                live.w[t] = 1.0
            else:
                live.w.fill_(1e3)  # a skipped step must not see this
        before = bank.weights("sigma" + repr(sigma_rel))["w"].clone()
        bank.update(torch.tensor(float(ok)))
        got = bank.weights("sigma" + repr(sigma_rel))["w"].double()
        if not ok:
            assert torch.equal(got.float(), before)
            continue
        t += 1
        tau = torch.arange(1, t + 1, dtype=torch.float64)
        want = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
        assert torch.allclose(got[:t], want, rtol=2e-5, atol=1e-7), (t, (got[:t] - want).abs().max())
        assert not got[t:].any()
        if t == n:
            break
    assert int(bank.row_state(bank.names.index("sigma" + repr(sigma_rel)))["t"]) == n


def test_a_bank_with_power_emas_reads_nothing_back_either():
    cfg = EMAConfig(decay=0.999, warmup_steps=2, decays=[0.9], posthoc=PostHocConfig(sigma_rels=[0.05, 0.1]))
    bank = EMA(_net(), cfg)
    with _CountScalarReads() as mode:
        for i in range(10):
            bank.update(torch.tensor(float(i % 3 != 0)))
    assert mode.count == 0


def test_bank_state_roundtrip_keeps_every_ema_and_the_power_time():
    cfg = EMAConfig(decay=0.9, decays=[0.8], posthoc=PostHocConfig(sigma_rels=[0.05]))
    a, b = EMA(_net(), cfg), EMA(_net(1), cfg)
    gen = torch.Generator().manual_seed(4)
    for i in range(6):
        _moving(a.source, gen)
        a.update(torch.tensor(float(i != 2)))
    parts_a, parts_b = a.parts(), b.parts()
    assert list(parts_a) == ["ema", "ema-decay0.8", "ema-sigma0.05"]
    for name in parts_a:
        parts_b[name].load_state_dict(parts_a[name].state_dict())
    assert parts_a["ema-sigma0.05"].state_dict()["t"] == 5  # one step of six skipped
    for name in a.names:
        assert h_same(a.weights(name), b.weights(name)), name
    b.source.load_state_dict(a.source.state_dict())
    for _ in range(3):  # and, from the same live weights, they go on identically
        a.update(torch.tensor(1.0))
        b.update(torch.tensor(1.0))
    assert all(h_same(a.weights(n), b.weights(n)) for n in a.names)


def h_same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
