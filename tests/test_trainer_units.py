"""Trainer pieces that need no launch: batch split, LR, seeds, EMA masking, checkpoint folders, dist helper."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from ema_pytorch import EMA as LucidrainsEMA

from pipeline import dist
from pipeline.checkpoint import folder as checkpoint
from pipeline.checkpoint import manager as ckpt_manager
from pipeline.config import ConfigError, EMAConfig, load_config
from pipeline.train.ema import EMA
from pipeline.train.step import (
    batch_split,
    classify_skip,
    cpu_has_bf16_units,
    lr_at,
    micro_seed,
    resolve_precision,
)
from tests.helpers.trainer import REPO


def test_batch_split_global_batch():
    assert batch_split(128, 0, 8) == (16, 1)
    assert batch_split(128, 8, 8) == (8, 2)
    assert batch_split(8, 4, 1) == (4, 2)
    with pytest.raises(ConfigError, match=r"train.batch_size=10 cannot be split over 4 processes"):
        batch_split(10, 0, 4)
    with pytest.raises(ConfigError, match="micro_batch_per_gpu"):
        batch_split(64, 16, 3)


def test_lr_warmup_is_linear_then_constant():
    assert lr_at(0, 2e-4, 5000) == pytest.approx(2e-4 / 5000)
    assert lr_at(2499, 2e-4, 5000) == pytest.approx(1e-4)
    assert lr_at(4999, 2e-4, 5000) == 2e-4
    assert lr_at(10**6, 2e-4, 5000) == 2e-4
    assert lr_at(0, 1e-3, 0) == 1e-3


def test_micro_seed_depends_on_all_three_and_is_stable():
    seeds = {micro_seed(s, st, m) for s in range(3) for st in range(3) for m in range(3)}
    assert len(seeds) == 27
    assert micro_seed(0, 5, 1) == micro_seed(0, 5, 1)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 2))


def test_ema_matches_ema_pytorch_and_skipped_step_leaves_it_unchanged():
    net, ref_net = _net(), _net()
    ours = EMA(net, EMAConfig(decay=0.99, warmup_steps=0, update_every=1, power=0.75))
    ref = LucidrainsEMA(ref_net, beta=0.99, update_after_step=0, update_every=1, power=0.75)
    for i in range(6):
        with torch.no_grad():
            for p, q in zip(net.parameters(), ref_net.parameters()):
                p.add_(0.1 * (i + 1))
                q.add_(0.1 * (i + 1))
        ours.update(torch.tensor(1.0))
        ref.update()
    for a, b in zip(ours.model.parameters(), ref.ema_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    before = {k: v.clone() for k, v in ours.weights().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(100.0)
    ours.update(torch.tensor(0.0))  # a skipped optimizer step: the EMA must not move
    after = ours.weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ours.num_updates == 7


def test_ema_counters_roundtrip():
    net = _net()
    a = EMA(net, EMAConfig(decay=0.9, warmup_steps=2, update_every=1, power=0.75))
    for _ in range(5):
        a.update(torch.tensor(1.0))
    b = EMA(_net(), EMAConfig(decay=0.9, warmup_steps=2, update_every=1, power=0.75))
    b.load_state_dict(a.state_dict())
    assert b.num_updates == 5 and b.schedule.weight(6) == a.schedule.weight(6)
    assert all(torch.equal(b.weights()[k], v) for k, v in a.weights().items())


def _fake_checkpoint(out, step, cfg, complete=True):
    d = out / (checkpoint.step_dir_name(step) if complete else f".tmp-{checkpoint.step_dir_name(step)}")
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(__import__("pipeline.config", fromlist=["to_yaml"]).to_yaml(cfg))
    (d / "meta.json").write_text(json.dumps({"step": step, "world_size": 1,
                                             "model_config_hash": checkpoint.model_config_hash(cfg)}))
    if complete:
        (d / checkpoint.COMPLETE).write_text(f"{step}\n")
    return d


def test_resume_auto_takes_newest_complete_and_ignores_incomplete(tmp_path):
    cfg = load_config(REPO / "configs" / "digits.yaml")
    _fake_checkpoint(tmp_path, 100, cfg)
    _fake_checkpoint(tmp_path, 200, cfg)
    _fake_checkpoint(tmp_path, 300, cfg, complete=False)  # killed while writing
    unmarked = tmp_path / checkpoint.step_dir_name(400)  # a folder without COMPLETE (copied by hand, ...)
    unmarked.mkdir()
    assert checkpoint.resolve_resume(tmp_path, "auto").name == "step-00000200"
    assert checkpoint.resolve_resume(tmp_path, "none") is None
    assert checkpoint.resolve_resume(tmp_path / "empty", "auto") is None
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.resolve_resume(tmp_path, str(unmarked))
    assert checkpoint.remove_stale_tmp(tmp_path) == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_mismatched_model_config_is_refused_listing_keys(tmp_path):
    cfg = load_config(REPO / "configs" / "digits.yaml")
    d = _fake_checkpoint(tmp_path, 100, cfg)
    other = load_config(REPO / "configs" / "digits.yaml", ["model.base_channels=64", "diffusion.timesteps=500",
                                                            "optimizer.lr=1e-5"])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_compatible(d, other, world_size=1)
    msg = str(err.value)
    assert "model.base_channels: checkpoint 32, now 64" in msg
    assert "diffusion.timesteps: checkpoint 1000, now 500" in msg
    assert "optimizer.lr" not in msg  # training settings may change on resume
    assert checkpoint.check_compatible(d, load_config(REPO / "configs" / "digits.yaml", ["optimizer.lr=1e-5"]), 1)


def test_ema_export_carries_its_config(tmp_path):
    cfg = load_config(REPO / "configs" / "digits.yaml")
    w = {"a.weight": torch.randn(3, 2)}
    checkpoint.export_ema(tmp_path / "ema.safetensors", w, cfg, step=7)
    weights, info = checkpoint.read_ema(tmp_path / "ema.safetensors")
    assert torch.equal(weights["a.weight"], w["a.weight"])
    assert info["step"] == 7 and info["model"]["base_channels"] == 32 and info["diffusion"]["timesteps"] == 1000


def test_dist_helpers_without_process_group():
    assert not dist.is_initialized()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.any_true(True) is True and dist.any_true(False) is False
    assert dist.broadcast_object({"x": 1}) == {"x": 1}
    assert dist.gather_object(3) == [3]
    dist.barrier()
    dist.init_flag_group()  # a no-op without a group


@pytest.mark.parametrize(("applied", "loss", "loss_scaling", "expected"), [
    (True, 0.5, False, (0.0, 0.0)),             # a normal step
    (True, 0.5, True, (0.0, 0.0)),
    (False, float("nan"), False, (1.0, 0.0)),   # NaN loss: non-finite, held against the policy
    (False, float("inf"), True, (1.0, 0.0)),    # ... also under fp16 loss scaling
    (False, 0.5, True, (0.0, 1.0)),             # fp16 overflow with a finite loss: the scaler at work
    (False, 0.5, False, (1.0, 0.0)),            # a non-finite gradient without loss scaling: non-finite
])
def test_skipped_steps_are_classified(applied, loss, loss_scaling, expected):
    bad, scaler_skip = classify_skip(torch.tensor(applied), torch.tensor(loss), loss_scaling)
    assert (bad.item(), scaler_skip.item()) == expected
    assert bad.dtype == scaler_skip.dtype == torch.float32


class _Counter:
    """A piece of state as a user would add one: anything with state_dict / load_state_dict."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_checkpoint_manager_saves_and_restores_every_registered_part(tmp_path):
    from accelerate import Accelerator

    from pipeline.train.loop import Progress

    cfg = load_config(REPO / "configs" / "digits.yaml", [f"train.out_dir={tmp_path}", "checkpoint.keep=2",
                                                         "checkpoint.every_steps=5"])
    acc = Accelerator(cpu=True)
    lin = acc.prepare(torch.nn.Linear(3, 2))
    ema = EMA(lin, cfg.ema)
    progress, counter, per_rank = Progress(), _Counter(41), _Counter(7)
    progress.step, progress.images_seen, progress.mlflow_run_id = 10, 640, "abc"
    manager = ckpt_manager.CheckpointManager(tmp_path, cfg.checkpoint, accelerator=acc, record=cfg, parts={
        "meta": progress, "ema": ema, "counter": counter, "data": ckpt_manager.PerRank(per_rank)})
    manager.start()
    assert [manager.due(s, final=False) for s in (4, 5, 10)] == [False, True, True] and manager.due(3, final=True)
    for step in (5, 10, 15):
        path = manager.save(step)
    assert [p.name for p in manager.complete()] == ["step-00000010", "step-00000015"]  # keep 2
    assert (path / "counter.json").is_file() and (path / "data" / "rank-0.json").is_file()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 15 and meta["images_seen"] == 640 and meta["model_config_hash"] == checkpoint.model_config_hash(cfg)

    fresh_progress, fresh_counter, fresh_per_rank = Progress(), _Counter(), _Counter()
    fresh_ema = EMA(torch.nn.Linear(3, 2), cfg.ema)
    again = ckpt_manager.CheckpointManager(tmp_path, cfg.checkpoint, accelerator=acc, record=cfg, parts={
        "meta": fresh_progress, "ema": fresh_ema, "counter": fresh_counter,
        "data": ckpt_manager.PerRank(fresh_per_rank)})
    assert again.resume() == path
    assert (fresh_counter.n, fresh_per_rank.n, fresh_progress.step, fresh_progress.mlflow_run_id) == (41, 7, 15, "abc")
    assert all(torch.equal(fresh_ema.weights()[k], v) for k, v in ema.weights().items())
    ckpt = checkpoint.Checkpoint(path)
    assert ckpt.step == 15 and ckpt.config().checkpoint.keep == 2 and set(ckpt.ema_weights()) == {"weight", "bias"}


def test_the_loader_position_is_one_record_and_per_rank_records_of_earlier_versions_still_resume(tmp_path):
    """LoaderPosition writes data.json (every stream's cursor); a checkpoint whose loader position is
    data/rank-<r>.json (as written before) resumes through the same part: a record of the old sample order
    continues at the next epoch boundary, with a warning."""
    from accelerate import Accelerator

    from pipeline.config import DataConfig
    from pipeline.data.loader import StreamingLoader
    from pipeline.train.loop import LoaderPosition, Progress
    from tests.helpers.data import make_shards

    folder, _ = make_shards(str(tmp_path), 20, per_shard=8)
    cfg = load_config(REPO / "configs" / "digits.yaml", [f"train.out_dir={tmp_path}/run"])
    acc = Accelerator(cpu=True)

    def loader():
        return StreamingLoader(DataConfig(shards=folder, num_workers=0, shuffle_buffer=8), batch_size=4)

    def manager(part):
        progress = Progress()
        progress.step = 3
        return ckpt_manager.CheckpointManager(tmp_path / "run", cfg.checkpoint, accelerator=acc, record=cfg,
                                              parts={"meta": progress, "data": part})

    first = loader()
    it = iter(first)
    for _ in range(3):
        next(it)
    saver = manager(LoaderPosition(first))
    saver.start()
    path = saver.save(3)
    record = json.loads((path / "data.json").read_text())
    assert (record["scope"], record["streams"], record["batches"]) == ("global", [[12]], 3)
    again = loader()
    assert manager(LoaderPosition(again)).resume() == path
    assert next(iter(again))["index"].tolist() == next(it)["index"].tolist()  # continues where it stopped
    it.close()

    class Version1:  # the per-rank record of an earlier version: another sample order, (epoch, slot) cursors
        def state_dict(self):
            return {"version": 1, "mode": "exact", "seed": 0, "num_samples": 20, "batch_size": 4, "world_size": 1,
                    "num_workers": 1, "shuffle_buffer": 8, "batches": 3, "cursors": [[0, 12]], "skipped": [0, 0]}

    shutil.rmtree(tmp_path / "run")
    old = manager(ckpt_manager.PerRank(Version1()))
    old.start()
    path = old.save(3)
    assert (path / "data" / "rank-0.json").is_file() and not (path / "data.json").exists()
    resumed = loader()
    with pytest.warns(UserWarning, match=r"earlier version .* continuing at the start of epoch 1"):
        assert manager(LoaderPosition(resumed)).resume() == path
    batch = next(iter(resumed))
    assert resumed.epoch == 1 and len(batch["index"]) == 4


@pytest.mark.parametrize(("grad_clip", "lr", "applied"), [
    (1.0, 1e-3, True),
    (0.0, 1e-3, True),                    # clipping off
    (float("nan"), 1e-3, False),          # a NaN bound would make every clipped gradient NaN
    (1.0, float("inf"), False),           # an infinite step
    (1.0, float("nan"), False),
])
def test_a_step_is_applied_only_if_the_update_it_applies_is_finite(grad_clip, lr, applied):
    from accelerate import Accelerator

    from pipeline.train.step import OptimizerStep

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    adam = torch.optim.Adam(lin.parameters(), lr=1e-3, fused=True)
    module, wrapped = acc.prepare(lin, adam)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    acc.backward(module(torch.randn(8, 4)).square().mean())
    ok, grad_norm = OptimizerStep(acc, module, adam, wrapped, grad_clip, deepspeed=False).step(lr)
    assert bool(ok) is applied and torch.isfinite(grad_norm)
    after = lin.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before) is applied


class _FakeEngine:
    """What OptimizerStep reads from a DeepSpeed engine: the host skip counter and the norm it computed."""

    def __init__(self) -> None:
        self.skipped_steps, self.norm = 0, torch.tensor(2.5)

    def get_global_grad_norm(self):
        return self.norm


def test_deepspeed_step_keeps_the_norm_on_the_device_and_copies_nothing_to_it():
    from types import SimpleNamespace

    from pipeline.train.step import OptimizerStep

    engine = _FakeEngine()
    adam = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    step = OptimizerStep(SimpleNamespace(device=torch.device("cpu")), engine, adam, adam, 1.0, deepspeed=True)
    applied, norm = step.step(1e-3)
    assert bool(applied) and norm.data_ptr() == engine.norm.data_ptr()  # DeepSpeed's own tensor, not a copy
    engine.skipped_steps, engine.norm = 1, float("inf")  # DeepSpeed skipped this one
    skipped, zero = step.step(1e-3)
    assert not bool(skipped) and float(zero) == 0.0
    again, _ = step.step(1e-3)  # the counter did not move: applied
    assert bool(again) and applied.data_ptr() == again.data_ptr()  # the same two flag tensors every step


def test_seed_generators_gives_the_random_streams_of_manual_seed():
    from pipeline.train.step import seed_generators

    def draws():
        return torch.randn(5), torch.randint(0, 1000, (5,)), torch.nn.functional.dropout(torch.ones(16), 0.5)

    seed = micro_seed(0, 7, 3)  # a 64-bit seed
    torch.manual_seed(seed)
    want = draws()
    torch.manual_seed(1)
    seed_generators(seed, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(want, draws()))


class _OneProcessAccelerator:
    def reduce(self, tensor, reduction):
        return tensor


def test_the_tick_sums_the_losses_in_one_reduce():
    from pipeline.train.ticks import TickStats

    tick = TickStats(torch.device("cpu"), 100, loss_scaling=False)
    tick.add(torch.ones(4), torch.ones(4), torch.tensor(True), torch.tensor(1.0), 0.0)
    metrics, longest = tick.flush(_OneProcessAccelerator(), 1e-3, 8)
    assert metrics["train/loss"] == 1.0 and longest == 0 and metrics["train/nonfinite_steps"] == 0


@pytest.mark.parametrize("process_group", [False, True], ids=["one-process", "gloo-group"])
def test_preemption_is_agreed_one_step_after_the_flag_is_exchanged(tmp_path, process_group):
    """Checked every 2 steps: without a process group the signal stops the next checked step; with one (a real
    gloo group of one rank: the exchange is a real non-blocking all-reduce) the step after it."""
    import signal

    import torch.distributed as tdist

    from pipeline.train.preemption import Preemption

    handlers = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    if process_group:
        tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        dist.init_flag_group()
    try:
        p = Preemption(check_every_steps=2)
        assert not p.pending and [p.step_end(s, final=False) for s in (1, 2, 3)] == [False] * 3
        signal.raise_signal(signal.SIGUSR1)  # during step 4
        assert p.pending
        if process_group:  # exchanged after step 4, read after step 5: stop there
            assert [p.step_end(s, final=False) for s in (4, 5)] == [False, True]
        else:
            assert p.step_end(4, final=False)
        q = Preemption(check_every_steps=1)
        signal.raise_signal(signal.SIGTERM)
        assert q.step_end(6, final=not process_group) is False  # the last step ends the run anyway
        if process_group:  # the exchange left in flight at a last step is read there, none is started
            assert q.step_end(7, final=True) is False and q._in_flight is None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if process_group:
            dist.shutdown()


def test_checkpoints_record_sha256_and_resume_falls_back_past_a_damaged_one(tmp_path, capsys):
    from accelerate import Accelerator

    from pipeline.train.loop import Progress

    cfg = load_config(REPO / "configs" / "digits.yaml", [f"train.out_dir={tmp_path}", "checkpoint.keep=5"])
    acc = Accelerator(cpu=True)
    lin = acc.prepare(torch.nn.Linear(3, 2))
    ema, progress = EMA(lin, cfg.ema), Progress()
    finite = [True]
    manager = ckpt_manager.CheckpointManager(tmp_path, cfg.checkpoint, accelerator=acc, record=cfg,
                                           parts={"meta": progress, "ema": ema},
                                           weights_finite=lambda: finite[0])
    manager.start()
    first, second = manager.save(1), manager.save(2)
    recorded = json.loads((second / "meta.json").read_text())["sha256"]
    assert {"ema.safetensors", "config.yaml", "accelerate/model.safetensors"} <= set(recorded)
    assert checkpoint.Checkpoint(second).verify() == []
    # 16 bytes changed in the newest checkpoint's weights: found, and auto falls back to the older one
    with open(second / "ema.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(bytes(16))
    assert "ema.safetensors has sha256" in checkpoint.Checkpoint(second).verify()[0]
    assert checkpoint.resolve_resume(tmp_path, "auto") == first
    assert f"checkpoint {second} fails verification: ema.safetensors has sha256" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.resume=.*ema.safetensors has sha256"):
        checkpoint.resolve_resume(tmp_path, str(second))
    (first / "config.yaml").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint .* passes"):
        checkpoint.resolve_resume(tmp_path, "auto")
    # non-finite weights: nothing is published, and the message names the newest checkpoint as it really is
    finite[0] = False
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="fails verification too"):
        manager.save(3)
    assert not (tmp_path / "step-00000003").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(("tf32", "benchmark", "deterministic"), [(False, True, False), (True, False, False),
                                                                  (True, True, True)])
def test_gpu_numerics_are_settings(tf32, benchmark, deterministic):
    """train.tf32 and train.cudnn_benchmark become torch's backend flags (cuDNN's autotuner stays off under
    train.deterministic); the flags are process-wide, so they are put back afterwards."""
    from pipeline.train.step import apply_numerics

    cfg = load_config(REPO / "configs" / "digits.yaml", [f"train.tf32={tf32}", f"train.cudnn_benchmark={benchmark}",
                                                         f"train.deterministic={deterministic}"])
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cudnn.benchmark)
    try:
        assert apply_numerics(cfg.train) == {"tf32": tf32, "cudnn_benchmark": benchmark and not deterministic}
        want = "tf32" if tf32 else "ieee"
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (want, want)
        assert torch.backends.cudnn.benchmark is (benchmark and not deterministic)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before[:2]
        torch.backends.cudnn.benchmark = before[2]
    with pytest.raises(ConfigError, match=r"train.dist_timeout_s=0.0 must be > 0"):
        load_config(REPO / "configs" / "digits.yaml", ["train.dist_timeout_s=0"])


def test_the_step_flop_count_is_the_unet_benchmarks_plus_attention_and_mfu_divides_by_the_known_peak():
    """The trainer counts one training step on the meta device (pipeline/train/flops.py); benchmarks/unet_bench.py
    counts real CPU tensors, where the fused attention kernel has no FLOP formula. The two differ by exactly the
    attention's closed form, forward 4·L²·C per block (QKᵀ and AV, L = H·W positions), backward twice that."""
    import sys
    from types import SimpleNamespace

    from pipeline.config import DiffusionConfig
    from pipeline.model.unet import AttnBlock, UNet, model_config
    from pipeline.train.flops import count_step_flops, peak_tflops, precision_of, utilisation

    sys.path.insert(0, str(REPO / "benchmarks"))
    from unet_bench import count_flops

    for preset in ("digits", "cifar10"):
        m = model_config(preset)
        net, shapes = UNet(m), []
        for mod in net.modules():
            if isinstance(mod, AttnBlock):
                mod.register_forward_hook(lambda _m, args, _o, seen=shapes: seen.append(tuple(args[0].shape)))
        _, bench = count_flops(net, 1)  # two passes (forward, then forward + backward): each block seen twice
        attention = sum(4 * (h * w) ** 2 * c for _, c, h, w in shapes[:len(shapes) // 2])
        assert attention > 0
        assert count_step_flops(SimpleNamespace(model=m, diffusion=DiffusionConfig())) == bench + 3 * attention
    # the CIFAR-10 net: 12.11 GFLOP per forward in benchmarks/unet_results.md, 12.44 with its attention
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4 and peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5 and peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    tc = SimpleNamespace(mixed_precision="no", tf32=False)
    assert precision_of(tc) == "fp32" and precision_of(SimpleNamespace(mixed_precision="bf16", tf32=False)) == "bf16"
    got = utilisation(37.3e9, 1000.0, 8, 989.4)  # 1,000 img/s over 8 GPUs at 37.3 GFLOP per image
    assert got["train/tflops_per_device"] == pytest.approx(37.3e9 * 1000 / 8 / 1e12)
    assert got["train/mfu"] == pytest.approx(got["train/tflops_per_device"] / 989.4)
    assert "train/mfu" not in utilisation(37.3e9, 1000.0, 8, None)  # CPU, or an unknown GPU: TFLOP/s only


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: sysret_ss_attrs
"""


@pytest.mark.parametrize(("extra", "max_isa", "native"), [
    ("avx512_bf16 avx512_vnni", "", True),  # Zen 4, Cooper Lake: bf16 units
    ("amx_bf16 amx_tile", "", True),  # Sapphire Rapids: AMX
    ("avx512_vnni", "", False),  # Skylake-SP, Zen 3 (no AVX-512 at all there): emulated
    ("avx512_bf16", "AVX2", False),  # oneDNN capped below its bf16 kernels
    ("avx512_bf16", "avx512_core", False),
    ("avx512_bf16", "AVX512_CORE_BF16", True),
    ("avx512_bf16", "ALL", True),
])
def test_bf16_units_are_read_from_the_cpu_flags_and_the_onednn_cap(extra, max_isa, native):
    assert cpu_has_bf16_units(_CPUINFO.format(extra=extra), max_isa) is native
    assert cpu_has_bf16_units("", "") is False  # no flags line (another OS): float32


def test_mixed_precision_auto_is_float32_on_a_cpu_without_bf16_units_and_explicit_bf16_warns(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # this CPU as one without bf16 units, whatever it has
    cfg = load_config(REPO / "configs" / "images32_cpu.yaml", [f"data.shards={tmp_path}"])
    assert cfg.train.mixed_precision == "auto"
    resolved, line = resolve_precision(cfg, on_gpu=False)
    assert resolved.train.mixed_precision == "no" and cfg.train.mixed_precision == "auto"
    assert line == "train.mixed_precision=auto: no (this CPU has no bf16 units (AVX512_BF16 or AMX))"
    explicit = load_config(REPO / "configs" / "images32_cpu.yaml",
                           [f"data.shards={tmp_path}", "train.mixed_precision=bf16"])
    kept, warning = resolve_precision(explicit, on_gpu=False)
    assert kept.train.mixed_precision == "bf16" and warning.startswith("warning: train.mixed_precision=bf16 on a CPU")
    assert resolve_precision(load_config(REPO / "configs" / "digits.yaml", [f"data.shards={tmp_path}"]),
                             on_gpu=False)[1] == ""  # "no" stays, silently
