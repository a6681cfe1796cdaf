"""pipeline/model/diffusion.py against closed forms, independent computations and an oracle denoiser."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipeline.config import DiffusionConfig
from pipeline.model.diffusion import (
    DDPMLoss,
    Diffusion,
    beta_schedule,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from pipeline.model.unet import UNet, model_config
from tests.helpers.diffusion import GaussianData, OracleDenoiser, alphas_cumprod

PAPER = DiffusionConfig()  # T = 1000, linear 1e-4 -> 0.02


@pytest.fixture(scope="module")
def paper() -> Diffusion:
    return Diffusion(PAPER)


# -- schedules ---------------------------------------------------------------------------------------------


def test_linear_schedule_is_the_papers(paper):
    np.testing.assert_allclose(paper.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    np.testing.assert_allclose(paper.alphas_cumprod.numpy(), alphas_cumprod(np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)
    assert paper.betas.dtype == torch.float64
    assert float(paper.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.01)  # ᾱ_T ≈ 0


def test_cosine_schedule_follows_improved_ddpm():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T).numpy()
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    expected = np.minimum(1 - (f[1:] / f[0]) / (f[:-1] / f[0]), 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    # Away from the clip, ᾱ_t is f(t)/f(0) itself.
    np.testing.assert_allclose(np.cumprod(1 - betas)[:900], (f[1:] / f[0])[:900], rtol=1e-9)


def test_warns_when_alpha_bar_T_is_not_near_zero():
    with pytest.warns(UserWarning, match=r"ᾱ_T = 0\.3\d+ is not near 0"):
        Diffusion(DiffusionConfig(timesteps=100))  # Σβ ≈ 1: e^-1 of the signal survives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Diffusion(PAPER)


def test_schedules_are_not_module_state_and_survive_a_bf16_cast(paper):
    net = UNet(model_config("digits"))
    loss_fn = DDPMLoss(net, paper)
    assert all(k.startswith("net.") for k in loss_fn.state_dict())
    loss_fn.to(torch.bfloat16)  # what DeepSpeed bf16 does to the module it is given
    assert paper.betas.dtype == paper.alphas_cumprod.dtype == torch.float64
    torch.manual_seed(0)
    loss, t = loss_fn(torch.rand(4, 1, 8, 8) * 2 - 1)  # fp32 data into a bf16 module
    assert loss.dtype == torch.float32 and loss.shape == (4,) and t.shape == (4,)
    assert torch.isfinite(loss).all()


def test_gather_follows_the_input_dtype(paper):
    x0 = torch.ones(3, 2, dtype=torch.float16)
    t = torch.tensor([0, 500, 999])
    xt = paper.q_sample(x0, t, torch.zeros_like(x0))
    assert xt.dtype == torch.float16
    np.testing.assert_allclose(xt[:, 0].float().numpy(), paper.sqrt_alphas_cumprod[t].numpy(), rtol=1e-3)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        paper.q_sample(x0, t[:2])


# -- forward process and posterior ---------------------------------------------------------------------------


def test_closed_form_q_matches_running_the_chain(paper):
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64).repeat(n, 1)  # (n, 4)
    x = x0.clone()
    checks = {0, 9, 99, 499, 999}
    for t in range(1000):
        beta = float(paper.betas[t])
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if t in checks:
            tt = torch.full((n,), t)
            mean, var, logvar = paper.q_mean_variance(x0, tt)
            v = float(var[0])
            assert math.log(v) == pytest.approx(float(logvar[0]), rel=1e-12)
            se_mean = math.sqrt(v / n)
            assert (x.mean(0) - mean[0]).abs().max() < 5 * se_mean, t
            np.testing.assert_allclose(x.var(0).numpy(), v, rtol=5 * math.sqrt(2 / n))
            # q_sample draws from the same distribution.
            xs = paper.q_sample(x0, tt, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
            assert (xs.mean(0) - mean[0]).abs().max() < 5 * se_mean
            np.testing.assert_allclose(xs.var(0).numpy(), v, rtol=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("t", [1, 2, 50, 500, 999])
def test_posterior_matches_bayes_rule_on_a_grid(paper, t):
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised numerically on a fine grid.
    beta = float(paper.betas[t])
    ac_prev = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t - 1])
    x0, xt = 0.3, -0.7
    # Cover both factors: the likelihood around x_t/√α_t and the prior around √ᾱ_{t-1} x_0.
    centres = (xt / math.sqrt(1 - beta), math.sqrt(ac_prev) * x0)
    width = 12 * max(math.sqrt(beta / (1 - beta)), math.sqrt(1 - ac_prev))
    grid = np.linspace(min(centres) - width, max(centres) + width, 1_000_001)
    log_p = norm.logpdf(xt, math.sqrt(1 - beta) * grid, math.sqrt(beta)) + norm.logpdf(
        grid, math.sqrt(ac_prev) * x0, math.sqrt(1 - ac_prev)
    )
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    grid_mean = float((w * grid).sum())
    grid_var = float((w * (grid - grid_mean) ** 2).sum())
    mean, var, logvar = paper.q_posterior(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t])
    )
    assert float(mean) == pytest.approx(grid_mean, abs=1e-4 * math.sqrt(grid_var))
    assert float(var) == pytest.approx(grid_var, rel=1e-5)
    assert float(logvar) == pytest.approx(math.log(grid_var), abs=1e-5)


def test_x0_eps_round_trip(paper):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 999])
    xt = paper.q_sample(x0, t, eps)
    torch.testing.assert_close(paper.predict_x0_from_eps(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(paper.predict_eps_from_x0(xt, t, x0), eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_is_its_closed_form_and_gives_back_x0(schedule):
    d = Diffusion(DiffusionConfig(schedule=schedule, prediction="v"))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 999])
    ac = torch.cumprod(1 - d.betas.double(), 0)[t].reshape(-1, 1, 1, 1)  # independently of the tables
    v = d.training_target(x0, eps, t)
    torch.testing.assert_close(v, ac.sqrt() * eps - (1 - ac).sqrt() * x0, rtol=0, atol=1e-12)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.model_output_to_x0(v, xt, t), x0, rtol=0, atol=1e-9)
    # the point of v: an output error of δ moves x̂_0 by at most δ; under ε by √(1/ᾱ_t − 1) δ (≈ 2·10⁴ at the
    # cosine schedule's t = T)
    delta = 1e-3 * torch.ones_like(v)
    assert float((d.model_output_to_x0(v + delta, xt, t) - x0).abs().max()) <= 1e-3 + 1e-12
    eps_err = float((Diffusion(DiffusionConfig(schedule=schedule)).model_output_to_x0(eps + delta, xt, t) - x0)
                    .abs().max())
    assert eps_err == pytest.approx(1e-3 * float((1 / ac[-1] - 1).sqrt()), rel=1e-6) and eps_err > 100 * 1e-3


# -- KL and the decoder ---------------------------------------------------------------------------------------


def test_normal_kl_is_zero_for_equal_and_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(100, generator=gen, dtype=torch.float64)
    l1, l2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(100, generator=gen, dtype=torch.float64)
    assert normal_kl(m1, l1, m1, l1).abs().max() < 1e-15  # zero up to float64 rounding
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mean", [-1.5, -1.0, -0.31, 0.0, 0.5, 0.999, 1.3])
@pytest.mark.parametrize("scale", [1e-4, 3e-3, 0.05, 1.0, 20.0])
def test_decoder_probabilities_over_the_256_bins_sum_to_one(mean, scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(
        bins, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64)
    )
    assert torch.isfinite(logp).all()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    # Independently, with scipy: an inner bin is the normal mass of [x - 1/255, x + 1/255].
    k = 100
    p = norm.cdf((float(bins[k]) + 1 / 255 - mean) / scale) - norm.cdf((float(bins[k]) - 1 / 255 - mean) / scale)
    if p > 1e-300:
        assert float(logp[k]) == pytest.approx(math.log(p), rel=1e-9)
    assert float(logp[0].exp()) == pytest.approx(norm.cdf((-1 + 1 / 255 - mean) / scale), abs=1e-15)


def test_decoder_is_accurate_far_in_the_tails():
    # A mean 50 sigma from the bin: scipy's logcdf difference as the reference.
    x, mean, scale = (torch.tensor(v, dtype=torch.float64) for v in (0.0, 0.5, 0.01))
    logp = float(discretized_gaussian_log_likelihood(x, mean, scale.log()))
    a, b = (-1 / 255 - 0.5) / 0.01, (1 / 255 - 0.5) / 0.01
    expected = norm.logcdf(b) + math.log(-math.expm1(norm.logcdf(a) - norm.logcdf(b)))
    assert logp == pytest.approx(expected, rel=1e-9)


# -- the oracle denoiser on Gaussian data: L_simple and bits/dim against closed forms ----------------------


def _quad_decoder_nll_nats(data: GaussianData, betas: np.ndarray, n: int = 80) -> float:
    """E[−log P_decoder(x_0 | x_1)] per dimension, by Gauss–Hermite quadrature over x_0 and the noise."""
    ac = alphas_cumprod(betas)
    a1, v1 = math.sqrt(ac[0]), 1 - ac[0]
    sigma_dec = math.sqrt(betas[1] * (1 - ac[0]) / (1 - ac[1]))  # β̃ at t = 1 stands in at t = 0 (both variances)
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    weights = weights / math.sqrt(2 * math.pi)
    u, z = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)
    total = 0.0
    for mu, s in zip(data.mu.ravel(), data.s.ravel()):
        x0 = mu + s * u
        x0_hat = mu + a1 * s**2 * (a1 * x0 + math.sqrt(v1) * z - a1 * mu) / (a1**2 * s**2 + v1)
        hi = np.where(x0 > 0.999, np.inf, (x0 + 1 / 255 - x0_hat) / sigma_dec)
        lo = np.where(x0 < -0.999, -np.inf, (x0 - 1 / 255 - x0_hat) / sigma_dec)
        p = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
        total += float((w * -np.log(p)).sum())
    return total / data.mu.size


def _analytic_bound_bpd(data: GaussianData, betas: np.ndarray, variance: str) -> dict[str, float]:
    ac = alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    mu, s2 = data.mu.ravel(), data.s.ravel() ** 2
    post_var = betas * (1 - ac_prev) / (1 - ac)
    coef1 = betas * np.sqrt(ac_prev) / (1 - ac)
    model_var = betas if variance == "fixedlarge" else post_var
    kl = []
    for t in range(1, len(betas)):
        a2, v = ac[t], 1 - ac[t]
        cond_var = s2 * v / (a2 * s2 + v)  # Var[x_0 | x_t]
        kl_t = 0.5 * (np.log(model_var[t] / post_var[t]) + post_var[t] / model_var[t] - 1 + coef1[t] ** 2 * cond_var / model_var[t])
        kl.append(kl_t.mean())
    aT2, vT = ac[-1], 1 - ac[-1]
    prior = (0.5 * (-1 - np.log(vT) + vT + aT2 * (mu**2 + s2))).mean()
    decoder = _quad_decoder_nll_nats(data, betas)
    ln2 = math.log(2)
    return {"prior": prior / ln2, "kl": np.array(kl) / ln2, "decoder": decoder / ln2,
            "total": (prior + sum(kl) + decoder) / ln2}


@pytest.fixture(scope="module")
def gaussian() -> GaussianData:
    return GaussianData((1, 4, 4), seed=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_l_simple_of_the_oracle_matches_its_closed_form(gaussian, paper, prediction):
    diffusion = Diffusion(DiffusionConfig(prediction=prediction))
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = alphas_cumprod(betas)
    oracle = OracleDenoiser(gaussian, betas, prediction)
    loss_fn = DDPMLoss(oracle, diffusion)
    torch.manual_seed(0)
    x0 = gaussian.sample(40_000, torch.Generator().manual_seed(3))
    loss, t = loss_fn(x0)
    assert loss.shape == t.shape == (40_000,) and int(t.min()) >= 0 and int(t.max()) <= 999
    s2 = gaussian.s.ravel() ** 2
    a2, v = ac[:, None], 1 - ac[:, None]
    # E[L | t]: the posterior variance of x_0 is s²v/(a²s² + v); an ε error is −(a/√v) times the x_0 error, a v
    # error −(1/√v) times it (v = aε − √v x_0 with ε = (x_t − a x_0)/√v)
    x0_var = s2 * v / (a2 * s2 + v)
    per_t = {"eps": a2 / v * x0_var, "x0": x0_var, "v": x0_var / v}[prediction].mean(1)
    residual = loss.double().numpy() - per_t[t.numpy()]
    assert abs(residual.mean()) < 4 * residual.std() / math.sqrt(len(residual))
    # And the t-averaged value, the number a training curve would approach.
    lo = loss.double().numpy()
    assert lo.mean() == pytest.approx(per_t.mean(), abs=4 * lo.std() / math.sqrt(len(lo)))


@pytest.fixture(scope="module")
def exact_bound(gaussian):
    betas = np.linspace(1e-4, 0.02, 1000)
    diffusion = Diffusion(PAPER)
    oracle = OracleDenoiser(gaussian, betas)
    x0 = gaussian.sample(600, torch.Generator().manual_seed(4))
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(x0))]
    res = diffusion.bound(oracle, x0, timesteps_k=0, generators=gens, clip_denoised=False)
    return diffusion, oracle, x0, res


def test_bits_per_dim_of_the_oracle_matches_the_analytic_bound(gaussian, exact_bound):
    _, _, x0, res = exact_bound
    analytic = _analytic_bound_bpd(gaussian, np.linspace(1e-4, 0.02, 1000), "fixedlarge")
    n = len(x0)
    se = float(res.total.std()) / math.sqrt(n)
    assert float(res.total.mean()) == pytest.approx(analytic["total"], abs=4 * se)
    assert se < 0.01 * abs(analytic["total"])  # the comparison has teeth
    assert float(res.decoder.mean()) == pytest.approx(analytic["decoder"], abs=4 * float(res.decoder.std()) / math.sqrt(n))
    assert float(res.prior.mean()) == pytest.approx(analytic["prior"], abs=4 * float(res.prior.std()) / math.sqrt(n))
    # A few individual KL terms, each within its own standard error.
    for t in (1, 10, 100, 999):
        col = res.terms[:, t]
        assert float(col.mean()) == pytest.approx(analytic["kl"][t - 1], abs=4 * float(col.std()) / math.sqrt(n) + 1e-12)
    assert res.total_se.abs().max() == 0  # the exact sum has no timestep-sampling error


def test_bound_with_fixedsmall_matches_its_analytic_value(gaussian):
    betas = np.linspace(1e-4, 0.02, 1000)
    diffusion = Diffusion(DiffusionConfig(variance="fixedsmall"))
    x0 = gaussian.sample(300, torch.Generator().manual_seed(5))
    res = diffusion.bound(OracleDenoiser(gaussian, betas), x0, timesteps_k=0, clip_denoised=False)
    analytic = _analytic_bound_bpd(gaussian, betas, "fixedsmall")
    se = float(res.total.std()) / math.sqrt(len(x0))
    assert float(res.total.mean()) == pytest.approx(analytic["total"], abs=4 * se)


def test_k_timestep_estimate_agrees_with_the_exact_sum_within_its_standard_error(exact_bound):
    diffusion, oracle, x0, exact = exact_bound
    gens = [torch.Generator().manual_seed(20_000 + i) for i in range(len(x0))]
    est = diffusion.bound(oracle, x0, timesteps_k=50, generators=gens, clip_denoised=False)
    assert est.t.shape == (len(x0), 51) and (est.t[:, 0] == 0).all()  # L_0 always, exactly
    assert all(len(set(row[1:].tolist())) == 50 and int(row[1:].min()) >= 1 for row in est.t)  # K distinct t
    torch.testing.assert_close(est.prior, exact.prior)
    d = (est.total - exact.total).numpy()
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(len(d))
    # The data-set level standard error (what bits_per_dim reports) covers the gap to the exact sum.
    se_data = float(est.total.std()) / math.sqrt(len(d))
    assert abs(float(est.total.mean() - exact.total.mean())) < 4 * se_data
    # The per-image standard error is calibrated in mean square: E[se²] = Var(estimate − exact sum).
    # (Per image it is itself noisy: the terms fall off steeply in t, so their sample spread is skewed.)
    assert 0.6 < float((est.total_se**2).mean()) / float(d.var()) < 1.6


def test_bits_per_dim_over_batches_is_independent_of_batch_size(gaussian):
    betas = np.linspace(1e-4, 0.02, 1000)
    diffusion = Diffusion(PAPER)
    oracle = OracleDenoiser(gaussian, betas)
    images = gaussian.sample(10, torch.Generator().manual_seed(6)).clamp(-1, 1)
    by3 = bits_per_dim(oracle, diffusion, [{"image": images[i : i + 3]} for i in range(0, 10, 3)], timesteps_k=20)
    by10 = bits_per_dim(oracle, diffusion, [{"image": images}], timesteps_k=20)
    by_cap = bits_per_dim(oracle, diffusion, [{"image": images}, {"image": images}], timesteps_k=20, max_images=10)
    assert by3.num_images == by10.num_images == by_cap.num_images == 10
    assert by3.bpd == pytest.approx(by10.bpd, rel=1e-12) and by3.bpd_se == pytest.approx(by10.bpd_se, rel=1e-9)
    assert by_cap.bpd == pytest.approx(by10.bpd, rel=1e-12)
    assert by10.bpd_se > 0 and by10.decoder_bpd > 0 and by10.terms_bpd == []


def test_bits_per_dim_rejects_bad_input(gaussian, paper):
    oracle = OracleDenoiser(gaussian, np.linspace(1e-4, 0.02, 1000))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        bits_per_dim(oracle, paper, [{"image": torch.full((2, 1, 4, 4), 3.0)}], timesteps_k=4)
    with pytest.raises(ValueError, match="no images"):
        bits_per_dim(oracle, paper, [], timesteps_k=4)
    with pytest.raises(TypeError, match='"image"'):
        bits_per_dim(oracle, paper, [torch.zeros(2, 1, 4, 4)], timesteps_k=4)
    for bad in (1, 1000, -3):
        with pytest.raises(ValueError, match=f"timesteps_k={bad} must be 0"):
            paper.bound(oracle, torch.zeros(2, 1, 4, 4), timesteps_k=bad)


# -- the training loss module ---------------------------------------------------------------------------------


def test_ddpm_loss_is_the_mse_of_the_noise_prediction(paper):
    net = UNet(model_config("digits"))
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # a network whose output is not ~0
    loss_fn = DDPMLoss(net, paper)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    net.eval()
    torch.manual_seed(7)
    loss, t = loss_fn(x0)
    # Replay the same draws from the global RNG and compute the loss by hand.
    torch.manual_seed(7)
    t2 = torch.randint(0, 1000, (6,))
    eps = torch.randn_like(x0)
    ac = torch.from_numpy(alphas_cumprod(np.linspace(1e-4, 0.02, 1000)))[t2].float().reshape(-1, 1, 1, 1)
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    with torch.no_grad():
        expected = ((net(xt, t2) - eps) ** 2).mean(dim=(1, 2, 3))
    assert torch.equal(t, t2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_ddpm_loss_under_bf16_autocast_stays_fp32_and_close(paper):
    net = UNet(model_config("digits")).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    loss_fn = DDPMLoss(net, paper)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    torch.manual_seed(8)
    ref, _ = loss_fn(x0)
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = loss_fn(x0)
    assert low.dtype == torch.float32
    # bf16 has 8 mantissa bits: per-sample losses agree to a few percent.
    torch.testing.assert_close(low.detach(), ref.detach(), rtol=0.05, atol=0.01)


def test_ddpm_loss_noise_does_not_depend_on_memory_format(paper):
    # randn_like fills in memory order: a channels_last batch would silently get a permutation of the noise.
    net = UNet(model_config("digits")).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    loss_fn = DDPMLoss(net, paper)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(9)
    ref, t_ref = loss_fn(x0)
    net.to(memory_format=torch.channels_last)
    torch.manual_seed(9)
    cl, t_cl = loss_fn(x0.contiguous(memory_format=torch.channels_last))
    assert torch.equal(t_ref, t_cl)
    torch.testing.assert_close(cl.detach(), ref.detach(), rtol=1e-4, atol=1e-6)
