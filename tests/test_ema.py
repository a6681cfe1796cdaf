"""The EMA (pipeline/ema.py): bit-for-bit the implementation it replaced, with no host sync; the ZeRO layout's
partition <-> state_dict mapping (pipeline/ema_deepspeed.py). The 2-process runs are in tests/test_ema_dist.py."""

from __future__ import annotations

import math

import pytest
import torch
from ema_pytorch import EMA as LucidrainsEMA
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import EMAConfig
from pipeline.ema import EMA, EMASchedule
from pipeline.ema_deepspeed import ZeroLayout, _Group, _Param


class PreviousEMA(LucidrainsEMA):
    """The EMA before the no-sync rewrite (commit 4e7a3f0, pipeline/ema.py's _MaskedEMA): ema-pytorch whose lerp weight is multiplied by a
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
