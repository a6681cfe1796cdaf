"""The CUDA paths: fp16 with loss scaling, bf16, the U-Net and the sampler on a GPU.

Skipped (and counted) where no CUDA device is present, as in CI; benchmarks/gpu_check.sh runs them on a
GPU machine together with the throughput benchmark. Trainer runs are real `launch/train.py` processes on
the tiny digits U-Net of tests/helpers/trainer.py.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from tests.helpers import trainer as h

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return h.prepare_digits(tmp_path_factory.mktemp("digits") / "shards")


def _losses(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+/\d+  loss (\S+)", stdout, re.M)]


def test_fp16_trains_with_loss_scaling_and_resumes(digits, tmp_path):
    common = [f"data.shards={digits}", "train.mixed_precision=fp16", "checkpoint.every_steps=4",
              "checkpoint.keep=10"]
    straight = h.run(h.train_cmd([*common, f"train.out_dir={tmp_path}/a", "train.total_steps=8"]), h.env())
    assert straight.returncode == 0, straight.stderr[-3000:]
    losses = _losses(straight.stdout)
    assert len(losses) == 4 and all(0 < x < 10 for x in losses), straight.stdout[-2000:]
    # Accelerate's GradScaler is in the checkpoint, with a finite positive scale.
    scaler = torch.load(tmp_path / "a" / "step-00000004" / "accelerate" / "scaler.pt", weights_only=True)
    assert 0 < float(scaler["scale"]) <= 65536.0 and torch.isfinite(torch.as_tensor(scaler["scale"]))

    # Stopped at step 4, resumed to 8: the same weights as the straight run up to GPU non-determinism
    # (nearest-upsampling backward uses atomics on CUDA).
    first = h.run(h.train_cmd([*common, f"train.out_dir={tmp_path}/b", "train.total_steps=4"]), h.env())
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = h.run(h.train_cmd([*common, f"train.out_dir={tmp_path}/b", "train.total_steps=8"]), h.env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = h.params(tmp_path / "a" / "step-00000008"), h.params(tmp_path / "b" / "step-00000008")
    assert h.max_diff(a, b) < 1e-3
    assert all(v.dtype == torch.float32 for v in a.values())  # fp16 autocast, fp32 master weights


def test_fp16_nan_loss_is_skipped_not_applied(digits, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}", "train.mixed_precision=fp16",
                           "train.total_steps=4", "checkpoint.every_steps=1", "checkpoint.keep=10",
                           "logging.every_steps=4"]),
              h.env(DDPM_FAULT_NAN_AT_STEP="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "non-finite 1" in r.stdout, r.stdout[-2000:]  # a NaN loss is not a loss-scaler skip
    s2, s3, s4 = (tmp_path / f"step-0000000{i}" for i in (2, 3, 4))
    assert h.same(h.params(s2), h.params(s3)) and h.same(h.ema(s2), h.ema(s3))
    assert all(torch.isfinite(v).all() for v in [*h.params(s4).values(), *h.ema(s4).values()])


def test_bf16_trains_with_fp32_weights_and_ema(digits, tmp_path):
    r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}", "train.mixed_precision=bf16",
                           "train.total_steps=4", "checkpoint.every_steps=2"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(r.stdout)) == 2 and all(0 < x < 10 for x in _losses(r.stdout))
    p2, p4 = h.params(tmp_path / "step-00000002"), h.params(tmp_path / "step-00000004")
    assert not h.same(p2, p4)
    assert all(v.dtype == torch.float32 for v in [*p4.values(), *h.ema(tmp_path / "step-00000004").values()])


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_training_steps_do_not_sync_host_and_device(digits, tmp_path, precision):
    # "No per-step host sync outside the logging ticks": with DDPM_CUDA_SYNC_CHECK=1 the trainer turns
    # torch.cuda.set_sync_debug_mode("error") on inside each step (from the third), so a sync there is an error.
    r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={tmp_path}", f"train.mixed_precision={precision}",
                           "train.total_steps=12", "logging.every_steps=6", "checkpoint.every_steps=100",
                           "train.deterministic=false"]),  # as shipped
              h.env(DDPM_CUDA_SYNC_CHECK="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(r.stdout)) == 2


def test_unet_on_cuda_matches_cpu():
    from pipeline.model.unet import UNet, model_config

    torch.manual_seed(0)
    net = UNet(model_config("cifar10")).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # the authors' init outputs ~0: make it say something
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        cpu = net(x, t)
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            gpu = net.cuda()(x.cuda(), t.cuda()).cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    assert (gpu - cpu).abs().max().item() <= 1e-4 * max(cpu.abs().max().item(), 1.0)


def test_cuda_samples_do_not_depend_on_batch_size():
    from pipeline.config import DiffusionConfig
    from pipeline.model.diffusion import Diffusion
    from pipeline.model.sampling import sample
    from pipeline.model.unet import UNet, model_config

    torch.manual_seed(0)
    net = UNet(model_config("digits")).cuda().eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    diffusion = Diffusion(DiffusionConfig())
    kw = dict(sampler="ddim", steps=10, device="cuda")
    big = sample(net, diffusion, range(8), batch_size=8, **kw)
    small = sample(net, diffusion, range(8), batch_size=3, **kw)
    assert big.shape == small.shape == (8, 1, 8, 8) and big.dtype == torch.uint8
    diff = (big.int() - small.int()).abs()
    # One generator per image: the same noise whatever the batch; kernels for other batch shapes may round
    # differently, which can move a pixel across one of the 256 levels, never more.
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 0.01


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.5), ("ancestral", 0.0)])
def test_cuda_sampling_never_waits_for_the_device_and_gives_the_cpus_images(sampler, eta):
    """The noise is each image's CPU draw (prefetched into pinned memory, copied without blocking): inside the
    sampling loop nothing syncs (torch's sync debug mode raises on a sync), and the images are the CPU's."""
    from pipeline.config import DiffusionConfig
    from pipeline.model.diffusion import Diffusion
    from pipeline.model.sampling import sample, sample_batch
    from pipeline.model.unet import UNet, model_config

    torch.manual_seed(0)
    net = UNet(model_config("digits")).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    diffusion = Diffusion(DiffusionConfig(timesteps=100))
    kw = dict(sampler=sampler, steps=10, eta=eta)
    cpu = sample(net, diffusion, range(6), batch_size=6, device="cpu", **kw)
    net.cuda()
    sample(net, diffusion, range(2), batch_size=2, device="cuda", **kw)  # warm-up: cached tables, kernels
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sample_batch(net, diffusion, gens, (1, 8, 8), device="cuda", **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    diff = (gpu.int() - cpu.int()).abs()
    # the same noise: only kernel rounding differs (a level here and there), never another image
    assert diff.max().item() <= 2 and (diff > 0).float().mean().item() < 0.02, diff.max()


@pytest.mark.parametrize("workers", [0, 1])
def test_the_trainers_batches_are_pinned_uint8_and_their_copy_leaves_the_host_free(digits, workers):
    """The input path as EDM's: the trainer's loader hands uint8 batches over in page-locked memory, so
    ``.to(device, non_blocking=True)`` only enqueues the copy. Shown behind a 200 ms kernel: the pinned copy
    returns at once, while the same batch from pageable memory (as float32, the path before) holds the host
    until the kernel is done."""
    from pipeline.config import DataConfig
    from pipeline.data.decode import unit_range
    from pipeline.data.loader import StreamingLoader

    loader = StreamingLoader(DataConfig(shards=str(digits), num_workers=workers), batch_size=16, uint8=True,
                             pin_memory=True)
    it = iter(loader)
    batch = next(it)
    it.close()
    assert batch["image"].dtype == torch.uint8 and batch["image"].is_pinned()
    big = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8).pin_memory()  # a 256x256 micro-batch
    pageable = unit_range(big.clone())  # float32, pageable: 4x the bytes
    assert not pageable.is_pinned()
    device = torch.device("cuda")
    unit_range(big.to(device, non_blocking=True))  # warm-up: the allocator, the kernels
    torch.cuda.synchronize()

    def host_ms(x):
        """(ms the host spent in the copy call, ms the kernel before it kept the GPU busy, the copy)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(400_000_000)  # cycles: ~0.2-0.4 s at 1-2 GHz
        end.record()
        t0 = time.perf_counter()
        y = x.to(device, non_blocking=True)
        held = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        return held, start.elapsed_time(end), y

    held_pinned, busy_ms, y = host_ms(big)
    held_pageable, busy2_ms, _ = host_ms(pageable)
    print(f"copy call on the host: pinned uint8 {held_pinned:.2f} ms, pageable float32 {held_pageable:.1f} ms "
          f"(behind kernels of {busy_ms:.0f} / {busy2_ms:.0f} ms)")
    assert torch.equal(unit_range(y).cpu(), pageable)  # converted on the device: the loader's float values
    assert held_pinned < 0.1 * busy_ms and held_pageable > 0.5 * busy2_ms, (held_pinned, held_pageable)


@pytest.mark.parametrize("tf32", [False, True])
def test_train_tf32_decides_the_float32_matmul_precision_on_the_gpu(tf32):  # and cudnn_benchmark the autotuner
    """train.tf32 (default false: float32 is IEEE float32, as EDM): with it a float32 matmul on an Ampere or
    later GPU rounds its inputs to TF32's 10-bit mantissa (relative error ~1e-3), without it ~1e-6."""
    from pipeline.config import TrainConfig
    from pipeline.train.step import apply_numerics

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs an Ampere or later GPU")
    try:
        assert apply_numerics(TrainConfig(tf32=tf32, cudnn_benchmark=tf32)) == {"tf32": tf32, "cudnn_benchmark": tf32}
        assert torch.backends.cudnn.benchmark is tf32  # cuDNN's autotuner follows train.cudnn_benchmark
        g = torch.Generator(device="cuda").manual_seed(0)
        a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
        err = ((a @ b).double() - a.double() @ b.double()).abs().max() / (a.double() @ b.double()).abs().max()
        assert (err > 1e-4) if tf32 else (err < 1e-5), err.item()
    finally:
        apply_numerics(TrainConfig())


def test_mixed_precision_auto_is_bf16_on_a_gpu_with_bf16_tensor_cores(tmp_path):
    """train.mixed_precision=auto on a GPU: bf16 from Ampere (compute capability 8.0) on, float32 before."""
    from pipeline.config import load_config
    from pipeline.train.step import resolve_precision

    cfg = load_config(h.REPO / "configs" / "images32_cpu.yaml", [f"data.shards={tmp_path}"])
    resolved, line = resolve_precision(cfg, on_gpu=True)
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "no"
    assert resolved.train.mixed_precision == expected
    assert line.startswith(f"train.mixed_precision=auto: {expected} ({torch.cuda.get_device_name()} ")
