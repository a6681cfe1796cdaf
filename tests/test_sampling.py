"""pipeline/model/sampling.py: per-seed determinism, DDIM(η=1, K=T) = ancestral, and the right distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import DiffusionConfig
from pipeline.model.diffusion import Diffusion
from pipeline.model.sampling import NoiseStream, ddim_steps, ddim_timesteps, sample, sample_batch
from pipeline.model.unet import UNet, model_config
from tests.helpers.diffusion import GaussianData, OracleDenoiser

SMALL = DiffusionConfig(timesteps=40, schedule="cosine")  # cheap chains with ᾱ_T ≈ 0


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    net = UNet(model_config("digits"))
    # Untrained nets predict ε ≈ 0; give the output layer weight so the samples depend on the network.
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("ancestral", 0.0)])
def test_image_i_depends_only_on_seed_i(net, sampler, eta):
    diffusion = Diffusion(SMALL)
    seeds = [11, 12, 13, 14, 15]
    kw = dict(sampler=sampler, steps=10, eta=eta)
    one_batch = sample(net, diffusion, seeds, batch_size=5, **kw)
    in_pairs = sample(net, diffusion, seeds, batch_size=2, **kw)
    alone = torch.cat([sample(net, diffusion, [s], batch_size=1, **kw) for s in seeds])
    reordered = sample(net, diffusion, seeds[::-1], batch_size=3, **kw)
    assert one_batch.dtype == torch.uint8 and one_batch.shape == (5, 1, 8, 8)
    # Batched convolutions may round differently by batch size; that can move a pixel by one level at most.
    for other in (in_pairs, alone, reordered.flip(0)):
        diff = (one_batch.int() - other.int()).abs()
        assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99
    assert len({bytes(im.numpy()) for im in one_batch}) == 5  # different seeds, different images


@pytest.mark.parametrize("prefetch", [False, True])
def test_the_noise_stream_is_each_images_own_randn_in_order(prefetch):
    seeds, shape, count = [5, 6, 7], (2, 3, 3), 4
    with NoiseStream([torch.Generator().manual_seed(s) for s in seeds], shape, torch.device("cpu"), count,
                     prefetch) as noise:
        got = [noise.next() for _ in range(count)]
        with pytest.raises(RuntimeError, match="all 4 draws were taken"):
            noise.next()
    ref = [torch.Generator().manual_seed(s) for s in seeds]
    for draw in got:  # torch.randn per image, in draw order: what an image's seed always gave
        assert torch.equal(draw, torch.stack([torch.randn(shape, generator=g) for g in ref]))


def test_a_prefetching_stream_stops_when_closed_early_and_passes_errors_on():
    gens = [torch.Generator().manual_seed(0)]
    noise = NoiseStream(gens, (4,), torch.device("cpu"), 1000, prefetch=True, depth=2)
    noise.next()
    noise.close()  # 999 untaken: the thread, blocked on a full queue, ends
    assert noise._thread is None
    bad = NoiseStream(gens, (-1,), torch.device("cpu"), 3, prefetch=True)  # a negative size fails in the thread
    with pytest.raises(RuntimeError, match="negative"):
        bad.next()
    bad.close()


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("ancestral", 0.0)])
def test_prefetched_noise_gives_the_same_images_and_uses_exactly_the_draws_counted(net, sampler, eta):
    diffusion = Diffusion(SMALL)
    runs = {}
    for prefetch in (False, True):
        gens = [torch.Generator().manual_seed(s) for s in (21, 22)]
        torch.manual_seed(0)  # the fixture's net is in train mode: its dropout draws from the global generator
        runs[prefetch] = sample_batch(net, diffusion, gens, (1, 8, 8), sampler, steps=8, eta=eta, prefetch=prefetch)
        # the stream drew exactly what the loop took: each generator is where that many draws leave it
        seq = ddim_timesteps(SMALL.timesteps, 8)
        draws = SMALL.timesteps if sampler == "ancestral" else 1 + sum(
            sigma > 0 for *_, sigma in ddim_steps(diffusion, seq, eta))
        for g, s in zip(gens, (21, 22)):
            ref = torch.Generator().manual_seed(s)
            for _ in range(draws):
                torch.randn((1, 8, 8), generator=ref)
            assert torch.equal(g.get_state(), ref.get_state())
    assert torch.equal(runs[False], runs[True])


def test_ddim_with_all_steps_and_eta_1_is_the_ancestral_sampler_with_fixedsmall(net):
    diffusion = Diffusion(DiffusionConfig(timesteps=40, schedule="cosine", variance="fixedsmall"))
    ts_ddim, ts_anc = [], []
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    x_ddim = sample_batch(net, diffusion, gens(), (1, 8, 8), "ddim", steps=40, eta=1.0, on_step=ts_ddim.append)
    x_anc = sample_batch(net, diffusion, gens(), (1, 8, 8), "ancestral", on_step=ts_anc.append)
    assert ts_ddim == ts_anc == list(range(39, -1, -1))
    torch.testing.assert_close(x_ddim, x_anc, rtol=0, atol=1e-4)
    # With fixedlarge the ancestral noise is larger: a different chain (so the test above has teeth).
    large = Diffusion(DiffusionConfig(timesteps=40, schedule="cosine", variance="fixedlarge"))
    x_large = sample_batch(net, large, gens(), (1, 8, 8), "ancestral")
    assert float((x_large - x_anc).abs().max()) > 1e-2


@pytest.mark.parametrize(("T", "K", "spacing", "want"), [
    # uniform: the DDIM authors' range(0, T, T // K), more than K entries when K does not divide T
    (1000, 50, "uniform", list(range(0, 1000, 20))),
    (1000, 30, "uniform", [33 * i for i in range(31)]),  # 31 steps, ending at 990
    (10, 3, "uniform", [0, 3, 6, 9]),
    (10, 4, "uniform", [0, 2, 4, 6, 8]),
    (10, 6, "uniform", list(range(10))),  # T // K = 1: every t
    (40, 40, "uniform", list(range(40))),
    # leading: the first K of those (this project's uniform before), far from T when K does not divide T
    (1000, 30, "leading", [33 * i for i in range(30)]),  # ends at 957
    (10, 4, "leading", [0, 2, 4, 6]),
    (10, 6, "leading", [0, 1, 2, 3, 4, 5]),
    # linspace: round(i (T-1) / (K-1)), halves to even; trailing: round((K-i) T / K) - 1
    (10, 4, "linspace", [0, 3, 6, 9]),
    (10, 3, "linspace", [0, 4, 9]),  # 4.5 -> 4
    (1000, 5, "linspace", [0, 250, 500, 749, 999]),  # 249.75, 499.5 -> 500, 749.25
    (10, 4, "trailing", [1, 4, 7, 9]),  # 2.5 -> 2, 5, 7.5 -> 8, 10, minus 1
    (10, 3, "trailing", [2, 6, 9]),
    (1000, 5, "trailing", [199, 399, 599, 799, 999]),
    (7, 1, "linspace", [0]),
    (7, 1, "trailing", [6]),
])
def test_ddim_timesteps_are_the_written_lists(T, K, spacing, want):
    assert ddim_timesteps(T, K, spacing) == want


@pytest.mark.parametrize("K", [10, 20, 25, 30, 50, 100, 250])
def test_ddim_timesteps_equal_diffusers_where_its_float_arithmetic_is_exact(K):
    from diffusers import DDIMScheduler

    for spacing in ("leading", "linspace", "trailing"):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
        scheduler.set_timesteps(K)
        assert ddim_timesteps(1000, K, spacing) == sorted(scheduler.timesteps.tolist()), spacing


def test_ddim_timesteps_are_distinct_in_range_for_every_step_count():
    T = 1000
    for K in range(1, T + 1):
        for spacing in ("uniform", "leading", "linspace", "trailing"):
            seq = ddim_timesteps(T, K, spacing)
            assert seq == sorted(set(seq)) and seq[0] >= 0 and seq[-1] < T, (K, spacing)
            assert len(seq) == (math.ceil(T / (T // K)) if spacing == "uniform" else K), (K, spacing)
        assert ddim_timesteps(T, K)[-1] >= T - T // K  # uniform always starts within T // K of T


def test_the_sampler_walks_the_uniform_list_of_the_ddim_authors(net, one_thread):
    visited = []
    gens = [torch.Generator().manual_seed(0)]
    sample_batch(net, Diffusion(SMALL), gens, (1, 8, 8), "ddim", steps=12, on_step=visited.append)
    assert visited == list(range(39, -1, -3))  # range(0, 40, 3) walked backwards: 14 network calls, from t = 39


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert ddim_timesteps(40, 40) == list(range(40))
    quad = ddim_timesteps(1000, 20, "quadratic")
    assert len(quad) == 20 and quad[0] == 0 and quad == sorted(set(quad)) and quad[-1] <= 800
    assert np.all(np.diff(quad) > 0) and np.diff(quad)[0] < np.diff(quad)[-1]  # dense near the data
    with pytest.raises(ValueError, match="steps=1001 must lie in 1..T=1000"):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="repeats timesteps"):
        ddim_timesteps(100, 60, "quadratic")
    with pytest.raises(ValueError, match="unknown spacing"):
        ddim_timesteps(100, 10, "log")


def _oracle_chain_moments(data, betas, sampler, steps, eta, variance="fixedlarge"):
    """Exact mean and variance of the sampler's output with the oracle (no clipping), per dimension.

    For Gaussian data every step is affine in x_t: x_prev − a_prev μ = f (x_t − a μ) + (fresh noise), so the
    moments follow a scalar recursion from x_T ~ N(0, I). ᾱ is recomputed with numpy here.
    """
    ac = np.cumprod(1 - betas)
    mu, s2 = data.mu, data.s**2
    T = len(betas)
    m, v = np.zeros_like(mu), np.ones_like(mu)  # moments of x_t
    if sampler == "ancestral":
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        model_var = betas.copy() if variance == "fixedlarge" else post_var.copy()
        for t in reversed(range(T)):
            a, var = np.sqrt(ac[t]), 1 - ac[t]
            gain = a * s2 / (a**2 * s2 + var)  # x̂0 = μ + gain (x_t − a μ)
            c1 = betas[t] * np.sqrt(ac_prev[t]) / (1 - ac[t])
            c2 = (1 - ac_prev[t]) * np.sqrt(1 - betas[t]) / (1 - ac[t])
            f = c1 * gain + c2
            m = c1 * mu + c2 * a * mu + f * (m - a * mu)
            v = f**2 * v + (model_var[t] if t > 0 else 0.0)
        return m, v
    seq = ddim_timesteps(T, steps)
    for i in reversed(range(len(seq))):
        t = seq[i]
        a, var = np.sqrt(ac[t]), 1 - ac[t]
        ap2 = ac[seq[i - 1]] if i > 0 else 1.0
        sig2 = eta**2 * (1 - ap2) / (1 - ac[t]) * (1 - ac[t] / ap2)
        c = np.sqrt(1 - ap2 - sig2)
        f = (np.sqrt(ap2) * a * s2 + c * np.sqrt(var)) / (a**2 * s2 + var)
        m = np.sqrt(ap2) * mu + f * (m - a * mu)
        v = f**2 * v + sig2
    return m, v


@pytest.mark.parametrize(
    ("sampler", "steps", "eta", "variance"),
    [("ddim", 50, 0.0, "fixedlarge"), ("ddim", 20, 0.6, "fixedlarge"), ("ancestral", 0, 0.0, "fixedlarge"),
     ("ancestral", 0, 0.0, "fixedsmall")],
)
def test_oracle_samples_have_the_moments_the_sampler_math_predicts(sampler, steps, eta, variance):
    data = GaussianData((1, 4, 4), seed=1)
    # The ancestral chain runs all T steps: a shorter schedule (still ᾱ_T ≈ 0) keeps it quick.
    cfg = DiffusionConfig(timesteps=200, beta_end=0.1, variance=variance) if sampler == "ancestral" else DiffusionConfig()
    n = 1500 if sampler == "ancestral" else 4000
    diffusion = Diffusion(cfg)
    betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps)
    oracle = OracleDenoiser(data, betas)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x = sample_batch(oracle, diffusion, gens, (1, 4, 4), sampler, max(steps, 1), eta, clip_denoised=False)
    m, v = _oracle_chain_moments(data, betas, sampler, steps, eta, variance)
    z = ((x.double().numpy() - m) / np.sqrt(v)).ravel()  # standardised: N(0, 1) if the sampler is right
    assert abs(z.mean()) < 4.5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    if sampler == "ancestral":
        # With all T steps the oracle chain lands near the data distribution (σ_t² = β_t overshoots the
        # spread a little, β̃_t undershoots: the paper's two bounds on the true reverse variance).
        np.testing.assert_allclose(np.sqrt(v), data.s, rtol=0.2)
        assert (np.sqrt(v) > data.s).all() if variance == "fixedlarge" else (np.sqrt(v) < data.s).all()
        np.testing.assert_allclose(m, data.mu, atol=0.01)


def test_sample_restores_training_mode_and_validates(net):
    diffusion = Diffusion(SMALL)
    net.train()
    out = sample(net, diffusion, [1], steps=4)
    assert net.training and out.shape == (1, 1, 8, 8)
    assert sample(net, diffusion, [], steps=4).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(net, diffusion, [1], sampler="euler")
    with pytest.raises(ValueError, match="steps=50 must lie in 1..T=40"):
        sample(net, diffusion, [1], steps=50)
    with pytest.raises(ValueError, match="eta=2"):
        sample(net, diffusion, [1], steps=4, eta=2)


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_near_fp32(net, monkeypatch):
    """precision=bf16: the U-Net's convolutions run in bf16 (autocast), the sampler's arithmetic in fp32; the
    images move by a few of the 256 levels, not more."""
    diffusion = Diffusion(SMALL)
    seeds = list(range(8))
    dtypes = []
    real_forward = net.conv_out.forward
    monkeypatch.setattr(net.conv_out, "forward", lambda x: dtypes.append(real_forward(x).dtype) or real_forward(x))
    fp32 = sample(net, diffusion, seeds, steps=10)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = sample(net, diffusion, seeds, steps=10, precision="bf16")
    assert set(dtypes) == {torch.bfloat16} and bf16.dtype == torch.uint8
    diff = (fp32.int() - bf16.int()).abs().float()
    assert 0 < float(diff.mean()) < 1.0 and int(diff.max()) <= 16  # measured: 0.12 and 5
    with pytest.raises(ValueError, match="precision='fp16'"):
        sample(net, diffusion, [1], steps=4, precision="fp16")
