"""The DDPM forward process, the reverse-process parameterisation, L_simple and the variational bound.

Ho et al. 2020 (arXiv 2006.11239) with the authors' code (hojonathanho/diffusion, diffusion_utils_2.py)
as the reference for every convention here:

* timesteps are indexed ``t = 0 .. T-1`` (the paper's ``t = 1 .. T``); ``t = 0`` is "diffused for one step";
* the schedules are computed in float64 and kept as plain CPU tensors on a plain Python object, never as
  module buffers, so a mixed-precision or DeepSpeed bf16 cast of the network never touches them; each use
  gathers the coefficients for ``t`` and casts them to the device and dtype of the tensor they multiply;
* the bound is reported in bits per dimension: ``L_T + sum_t L_{t-1} + L_0`` divided by ``D log 2``.

Pure torch: no accelerate, torch.distributed or mlflow here (docs/architecture.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import DiffusionConfig

# ᾱ_T above this leaves visible signal at t = T, so x_T ~ N(0, I) at sampling time is a poor start.
ALPHA_BAR_T_WARN = 1e-3
_LOG2 = math.log(2.0)


def beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_1..β_T in float64: ``linear`` (the paper's) or ``cosine`` (Nichol & Dhariwal 2021, s = 0.008)."""
    if timesteps < 1:
        raise ValueError(f"timesteps={timesteps} must be >= 1")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        # The clip at 0.999 is improved DDPM's: it keeps the last steps from being singular.
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_diff_ndtr(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(lower)) for upper > lower, accurate in both tails (float64 in, float64 out)."""
    # Work in the lower tail, where log_ndtr is accurate: Φ(b) − Φ(a) = Φ(−a) − Φ(−b).
    flip = (upper + lower) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    # log(e^x − e^y) = x + log(−expm1(y − x)); y − x < 0 since lo < hi.
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(x) of the paper's discretized Gaussian decoder (§3.3, eq. 13), in nats.

    ``x`` holds pixel values k/127.5 − 1 (k = 0..255); each bin is [x − 1/255, x + 1/255] with the first and
    last bins extended to −∞ and +∞, so the 256 probabilities sum to one. Computed in float64 with exact
    normal CDFs (the authors used a tanh approximation and a 1e-12 floor; neither is needed here).
    """
    x, mean, log_scale = (v.to(torch.float64) for v in torch.broadcast_tensors(x, mean, log_scale))
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255.0) * inv_std
    lower = (x - mean - 1.0 / 255.0) * inv_std
    inf = torch.full_like(x, math.inf)
    upper = torch.where(x > 0.999, inf, upper)
    lower = torch.where(x < -0.999, -inf, lower)
    return _log_diff_ndtr(upper, lower)


def discretized_gaussian_log_likelihood_tanh(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The authors' decoder log P(x) (diffusion_tf/utils.py), for measuring the difference only: the normal CDF
    by the tanh approximation 0.5 (1 + tanh(√(2/π) (z + 0.044715 z³))), each probability floored at 1e-12, in
    float32 as they ran it (``dtype=torch.float64`` separates the approximation from float32's cancellation of
    Φ(upper) − Φ(lower) near 1). The exact one above is what the bound uses (docs/model.md, Reproducing Table 1).
    """
    x, mean, log_scale = (v.to(dtype) for v in torch.broadcast_tensors(x, mean, log_scale))

    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))

    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class BoundTerms:
    """The variational bound of a batch, per image, in bits/dim.

    ``total`` is the bound (exact, or the unbiased K-timestep estimate), ``total_se`` its standard error
    over the timestep sampling (0 for the exact sum), ``prior`` is L_T, ``decoder`` is L_0 (always exact),
    ``terms`` the per-timestep values at ``t`` ((B, T) with t = 0..T-1 for the exact sum; (B, K + 1) with
    t = 0 first in K-mode) and ``mse`` the x_0-prediction MSE there.
    """

    total: torch.Tensor
    total_se: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    terms: torch.Tensor
    t: torch.Tensor
    mse: torch.Tensor


@dataclass
class BoundEstimate:
    """The bound over a data set: mean bits/dim and its standard error over the images."""

    bpd: float  # mean over images of the per-image bound (or its unbiased estimate)
    bpd_se: float  # standard error of that mean (images and, in K-mode, timestep sampling together)
    num_images: int
    prior_bpd: float  # mean L_T
    decoder_bpd: float  # mean L_0 (always computed exactly)
    terms_bpd: list[float]  # mean L_t for t = 0..T-1 (exact mode; empty in K-mode)
    timesteps_k: int  # 0 = exact sum over all T


class Diffusion:
    """Schedules and the Gaussian algebra of DDPM. A plain object (not an nn.Module) on purpose.

    All tables are float64 CPU tensors of length T, indexed by t = 0..T-1.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self._device_tables: dict[tuple[int, str], torch.Tensor] = {}
        self.num_timesteps = T = int(cfg.timesteps)
        self.prediction = cfg.prediction
        self.variance = cfg.variance
        betas = beta_schedule(cfg.schedule, T, cfg.beta_start, cfg.beta_end)
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError(f"the {cfg.schedule} schedule gave betas outside (0, 1); check diffusion.beta_start/end")
        alphas = 1.0 - betas
        self.betas = betas
        self.alphas_cumprod = ac = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-ac)
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t).
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * alphas.sqrt() / (1.0 - ac)
        # β̃_0 = 0: as in the authors' code the log is taken with β̃_1 in its place (only the decoder uses it).
        pv1 = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv1.reshape(1), self.posterior_variance[1:]]))
        # Reverse-process variance σ_t²: fixedlarge = β_t (with β̃_1 at t = 0 for a better decoder, the
        # authors' choice), fixedsmall = β̃_t.
        if cfg.variance == "fixedlarge":
            self.model_log_variance = torch.log(torch.cat([pv1.reshape(1), betas[1:]]))
        else:
            self.model_log_variance = self.posterior_log_variance_clipped
        self.model_variance = self.model_log_variance.exp()

        alpha_bar_T = float(ac[-1])
        if alpha_bar_T > ALPHA_BAR_T_WARN:
            warnings.warn(
                f"ᾱ_T = {alpha_bar_T:.3g} is not near 0 (diffusion.timesteps={T}, schedule={cfg.schedule}, "
                f"beta_end={cfg.beta_end}): x_T still carries signal, so sampling from N(0, I) starts off the "
                "forward process and L_T is large; raise diffusion.timesteps or diffusion.beta_end",
                stacklevel=2,
            )

    # -- helpers ------------------------------------------------------------------------------------------

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to (B, 1, 1, ...) on like's device, in like's dtype (float64 tables stay exact).

        The gather runs on t's device from a cached copy of the table there: no host-device sync per step.
        """
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({like.shape[0]},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise ValueError(f"t must hold integer timesteps 0..{self.num_timesteps - 1}, got dtype {t.dtype}")
        key = (id(table), str(t.device))
        on_device = self._device_tables.get(key)
        if on_device is None:
            # MPS has no float64; everywhere else the gather stays in float64.
            on_device = table.to(t.device, torch.float32 if t.device.type == "mps" else torch.float64)
            self._device_tables[key] = on_device
        dtype = like.dtype if like.is_floating_point() else torch.float32
        out = on_device[t.long()].to(device=like.device, dtype=dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # -- forward process ----------------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)."""
        mean = self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._gather(1.0 - self.alphas_cumprod, t, x0)
        logvar = self._gather(self.log_one_minus_alphas_cumprod, t, x0)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) in closed form: √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)  # memory-format independent
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def q_posterior(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._gather(self.posterior_mean_coef1, t, xt) * x0 + self._gather(self.posterior_mean_coef2, t, xt) * xt
        var = self._gather(self.posterior_variance, t, xt)
        logvar = self._gather(self.posterior_log_variance_clipped, t, xt)
        return mean, var, logvar

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
        return self._gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        ) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t / √ᾱ_t − x_0) / √(1/ᾱ_t − 1)."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        )

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output for x_t = q_sample(x0, t, noise), by ``diffusion.prediction``: ε, x_0,
        or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, the velocity of x_t along the circle of its SNR)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self._gather(self.sqrt_alphas_cumprod, t, x0) * noise - self._gather(
                self.sqrt_one_minus_alphas_cumprod, t, x0
            ) * x0
        return x0

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v: an error in v reaches x_0 at most once, where ε's is multiplied by
        √(1/ᾱ_t − 1) (≈ 2·10⁴ at the cosine schedule's t = T)."""
        return self._gather(self.sqrt_alphas_cumprod, t, xt) * xt - self._gather(
            self.sqrt_one_minus_alphas_cumprod, t, xt
        ) * v

    # -- reverse process ----------------------------------------------------------------------------------

    def model_output_to_x0(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction of x_0 (from ε, from v, or directly, by ``diffusion.prediction``)."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(xt, t, out)
        if self.prediction == "v":
            return self.predict_x0_from_v(xt, t, out)
        return out

    def p_mean_variance(
        self, net: Callable, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of p_θ(x_{t-1} | x_t), and the predicted x_0 (all float32).

        The mean is the posterior mean with x_0 replaced by the network's prediction, clipped to [−1, 1]
        when ``clip_denoised`` (the authors' default for sampling and the bound; any mean keeps the bound valid).
        """
        xt = xt.float()
        out = _call_net(net, xt, t).float()
        x0 = self.model_output_to_x0(out, xt, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0, xt, t)
        logvar = self._gather(self.model_log_variance, t, xt).expand_as(xt)
        return mean, logvar.exp(), logvar, x0

    # -- the variational bound ----------------------------------------------------------------------------

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in bits/dim (no network involved)."""
        x0 = x0.to(torch.float64)
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return _mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))) / _LOG2

    def vb_terms_bpd(
        self, net: Callable, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: L_{t} in bits/dim (the decoder NLL L_0 where t = 0, else the KL of the posterior from
        p_θ), and the MSE of the predicted x_0."""
        mean, _, logvar, x0_pred = self.p_mean_variance(net, xt, t, clip_denoised)
        x0_64 = x0.to(torch.float64)
        true_mean, _, true_logvar = self.q_posterior(x0_64, xt.to(torch.float64), t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean.double(), logvar.double())) / _LOG2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0_64, mean, 0.5 * logvar)) / _LOG2
        mse = _mean_flat((x0_pred.double() - x0_64) ** 2)
        return torch.where(t.to(kl.device) == 0, nll, kl), mse

    @torch.no_grad()
    def bound(
        self,
        net: Callable,
        x0: torch.Tensor,
        timesteps_k: int = 0,
        generators: list[torch.Generator] | None = None,
        clip_denoised: bool = True,
    ) -> BoundTerms:
        """The variational bound of each image in bits/dim.

        ``timesteps_k = 0``: the exact sum over all T terms (T network calls). ``timesteps_k = K`` (2 ≤ K < T):
        L_0 and L_T exactly, and the middle sum Σ_{t=1}^{T-1} L_t estimated without bias from K distinct
        timesteps drawn uniformly from 1..T−1 per image, weighted (T−1)/K, with standard error
        (T−1)·s·√((1 − K/(T−1))/K) from the sample spread s of the K terms (K + 1 network calls).
        L_0 is kept out of the sampling because it is the largest term by far (about half the bound of a
        trained CIFAR-10 model): drawn at rate K/T it would dominate the variance and make s useless.
        ``generators`` (one CPU generator per image) make the noise of image i depend only on its generator,
        whatever the batch; default: torch's global RNG.
        """
        T, B = self.num_timesteps, x0.shape[0]
        if timesteps_k < 0 or timesteps_k == 1 or timesteps_k >= T:
            raise ValueError(
                f"timesteps_k={timesteps_k} must be 0 (exact sum over all T={T}) or 2..{T - 1} (an unbiased "
                "estimate from K timesteps with a standard error)"
            )
        if generators is not None and len(generators) != B:
            raise ValueError(f"need one generator per image: got {len(generators)} for a batch of {B}")
        device = x0.device
        x0 = x0.float()

        def noise() -> torch.Tensor:
            if generators is None:
                return torch.randn(x0.shape, device=device)
            return torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)

        if timesteps_k == 0:
            t_bt = torch.arange(T).expand(B, T)
        else:
            if generators is None:
                keys = torch.rand(B, T - 1)
            else:
                keys = torch.stack([torch.rand(T - 1, generator=g) for g in generators])
            drawn = keys.argsort(dim=1)[:, :timesteps_k].sort(dim=1).values + 1
            t_bt = torch.cat([torch.zeros(B, 1, dtype=torch.long), drawn], dim=1)  # column 0: L_0, exactly
        n_cols = t_bt.shape[1]
        terms = torch.empty(B, n_cols, dtype=torch.float64)
        mse = torch.empty(B, n_cols, dtype=torch.float64)
        # Largest t first (the order fixes each generator's noise stream).
        for k in reversed(range(n_cols)):
            t = t_bt[:, k].to(device)
            xt = self.q_sample(x0, t, noise())
            vals, err = self.vb_terms_bpd(net, x0, xt, t, clip_denoised)
            terms[:, k], mse[:, k] = vals.cpu(), err.cpu()
        prior = self.prior_bpd(x0).cpu()
        decoder = terms[:, 0].clone()
        if timesteps_k == 0:
            total = terms.sum(1) + prior
            se = torch.zeros(B, dtype=torch.float64)
        else:
            K, N = timesteps_k, T - 1
            middle = terms[:, 1:]
            total = decoder + middle.sum(1) * (N / K) + prior
            se = N * middle.std(dim=1, unbiased=True) * math.sqrt((1.0 - K / N) / K)
        return BoundTerms(total=total, total_se=se, prior=prior, decoder=decoder, terms=terms, t=t_bt, mse=mse)


def _call_net(net: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """net(x, t) with x in the dtype of the network's parameters (a DeepSpeed bf16 module wants bf16 input)."""
    if isinstance(net, nn.Module):
        p = next(net.parameters(), None)
        if p is not None and p.is_floating_point() and p.dtype != x.dtype:
            x = x.to(p.dtype)
    return net(x, t)


@dataclass
class PerImageBound:
    """Per-image bound terms of a set of images (one process's share, mergeable with ``summarize_bound``)."""

    index: torch.Tensor  # (N,) int64: the image's position in the data set (its generator is seed + index)
    total: torch.Tensor  # (N,) float64: the bound (or its K-timestep estimate), bits/dim
    prior: torch.Tensor  # (N,) L_T
    decoder: torch.Tensor  # (N,) L_0
    term_sum: torch.Tensor | None  # (T,) Σ over these images of L_t (exact mode), else None
    timesteps_k: int


def bound_per_image(
    net: Callable,
    diffusion: Diffusion,
    batches: Iterable[dict],
    timesteps_k: int = 0,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    clip_denoised: bool = True,
    progress: bool = False,
) -> PerImageBound:
    """The bound of every image of ``batches`` (see ``bits_per_dim``), kept per image.

    A batch may carry ``"index"`` (B,): the images' positions in the whole data set, which seed their
    generators (``seed + index``); without it, image n of this stream is position n. With the index, a data
    set split over processes gives every image the terms it gets in one process.
    """
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images={max_images} must be positive (or None for the whole iterable)")
    indices: list[torch.Tensor] = []
    totals: list[torch.Tensor] = []
    priors: list[torch.Tensor] = []
    decoders: list[torch.Tensor] = []
    term_sum: torch.Tensor | None = None
    seen = 0
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    bar = None
    if progress:

        bar = tqdm(total=max_images, unit="img", desc=f"bits/dim ({'exact' if not timesteps_k else f'K={timesteps_k}'})")
    try:
        for batch in batches:
            if not isinstance(batch, dict) or "image" not in batch:
                raise TypeError('bits_per_dim expects batches as dicts with an "image" tensor (B, C, H, W) in [-1, 1]')
            x0 = batch["image"]
            index = torch.as_tensor(batch["index"], dtype=torch.long) if "index" in batch else \
                torch.arange(seen, seen + x0.shape[0])
            if max_images is not None:
                x0, index = x0[: max_images - seen], index[: max_images - seen]
            if x0.numel() == 0:
                break
            lo, hi = float(x0.min()), float(x0.max())
            if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
                raise ValueError(f"images must lie in [-1, 1] for bits/dim; this batch spans [{lo:.3g}, {hi:.3g}]")
            if device is not None:
                x0 = x0.to(device)
            gens = [torch.Generator().manual_seed(seed + int(i)) for i in index]
            res = diffusion.bound(net, x0, timesteps_k=timesteps_k, generators=gens, clip_denoised=clip_denoised)
            indices.append(index)
            totals.append(res.total)
            priors.append(res.prior)
            decoders.append(res.decoder)
            if timesteps_k == 0:
                term_sum = res.terms.sum(0) if term_sum is None else term_sum + res.terms.sum(0)
            seen += x0.shape[0]
            if bar is not None:
                bar.update(x0.shape[0])
            if max_images is not None and seen >= max_images:
                break
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            net.train()
    empty = torch.empty(0, dtype=torch.float64)
    return PerImageBound(
        index=torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
        total=torch.cat(totals) if totals else empty, prior=torch.cat(priors) if priors else empty,
        decoder=torch.cat(decoders) if decoders else empty, term_sum=term_sum, timesteps_k=timesteps_k,
    )


def summarize_bound(parts: Sequence[PerImageBound]) -> BoundEstimate:
    """Mean bits/dim over the images of all ``parts`` (e.g. one per process) and its standard error."""
    index = torch.cat([p.index for p in parts])
    if index.numel() == 0:
        raise ValueError("bits_per_dim got no images: the batch iterable was empty")
    if index.unique().numel() != index.numel():
        raise ValueError("bits_per_dim: an image index occurs twice; the parts overlap")
    order = index.argsort()  # a fixed summation order, whatever the split over processes
    total, prior, decoder = (torch.cat([getattr(p, k) for p in parts])[order] for k in ("total", "prior", "decoder"))
    n = total.numel()
    sums = [p.term_sum for p in parts if p.term_sum is not None]
    term_sum = torch.stack(sums).sum(0) if sums else None
    return BoundEstimate(
        bpd=float(total.mean()),
        bpd_se=float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan,
        num_images=n,
        prior_bpd=float(prior.mean()),
        decoder_bpd=float(decoder.mean()),
        terms_bpd=(term_sum / n).tolist() if term_sum is not None else [],
        timesteps_k=parts[0].timesteps_k,
    )


def bits_per_dim(net: Callable, diffusion: Diffusion, batches: Iterable[dict], **options: Any) -> BoundEstimate:
    """The variational bound over a data set, in bits/dim: mean over images and its standard error.

    ``batches`` yields dicts with ``"image"``: float (B, C, H, W) in [−1, 1] on the 256-level grid (as the
    streaming loader gives them), optionally ``"index"`` (see ``bound_per_image``). Image n of the stream
    uses a generator seeded with ``seed + n``, so the result does not depend on the batch size.
    ``timesteps_k``: 0 = exact sum over all T (T network calls per batch), K = the unbiased K-timestep
    estimate (the standard error then includes its sampling noise). ``net`` is put in eval mode for the
    call and restored afterwards. ``options``: those of ``bound_per_image`` (timesteps_k, max_images, device,
    seed, clip_denoised, progress).
    """
    return summarize_bound([bound_per_image(net, diffusion, batches, **options)])


class DDPMLoss(nn.Module):
    """L_simple as a module, so the one module handed to the accelerator holds the network.

    ``forward(x0, t=None, noise=None)`` draws t ~ U{0..T−1} and ε ~ N(0, I) from torch's global RNG on x0's
    device where they are not given (the trainer gives them: pipeline.train.step.StepNoise), and returns
    ``(loss_per_sample (B,), t (B,))``: the MSE of the network's output against ``Diffusion.training_target``
    (ε, x_0 or v by ``diffusion.prediction``), averaged over pixels, in float32 even under autocast. The caller
    reduces.
    """

    def __init__(self, net: nn.Module, diffusion: Diffusion) -> None:
        super().__init__()
        self.net = net
        self.diffusion = diffusion  # a plain object: a module cast (bf16, .half()) never reaches the schedules

    def forward(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0.float()
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            # Not randn_like: that fills in memory order, so a channels_last batch would get permuted noise.
            noise = torch.randn(x0.shape, device=x0.device)
        xt = self.diffusion.q_sample(x0, t, noise)
        out = _call_net(self.net, xt, t)
        loss = _mean_flat((out.float() - self.diffusion.training_target(x0, noise, t)) ** 2)
        return loss, t
