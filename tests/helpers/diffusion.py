"""A Gaussian data set whose optimal denoiser is known in closed form (for diffusion and sampler tests).

Data: x_0 ~ N(μ, diag(s²)). Under q, x_t = a x_0 + σ ε with a = √ᾱ_t, σ = √(1 − ᾱ_t), so (x_0, x_t) is
jointly Gaussian and, per dimension,

    E[x_0 | x_t] = μ + a s² (x_t − a μ) / (a² s² + σ²),      Var[x_0 | x_t] = s² σ² / (a² s² + σ²),
    E[ε | x_t]   = σ (x_t − a μ) / (a² s² + σ²),              E[(ε − E[ε|x_t])²] = a² s² / (a² s² + σ²).

ᾱ_t is recomputed here from β with numpy, independently of pipeline.model.diffusion.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GaussianData:
    def __init__(self, shape: tuple[int, int, int] = (1, 4, 4), seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.shape = shape
        d = int(np.prod(shape))
        # Kept well inside [-1, 1] so clipping and the decoder's edge bins hardly matter.
        self.mu = rng.uniform(-0.3, 0.3, d).reshape(shape)
        self.s = rng.uniform(0.05, 0.2, d).reshape(shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return (torch.from_numpy(self.mu) + torch.from_numpy(self.s) * z).float()


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


class OracleDenoiser(nn.Module):
    """The Bayes-optimal ε-, x_0- or v-prediction for GaussianData under a given β schedule."""

    def __init__(self, data: GaussianData, betas: np.ndarray, prediction: str = "eps") -> None:
        super().__init__()
        self.data = data
        self.ac = torch.from_numpy(alphas_cumprod(betas))
        self.prediction = prediction
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        ac = self.ac[t.cpu()].reshape(-1, 1, 1, 1)
        a, var = ac.sqrt(), 1.0 - ac
        mu, s2 = torch.from_numpy(self.data.mu), torch.from_numpy(self.data.s) ** 2
        xt = x.double().cpu()
        denom = a**2 * s2 + var
        eps = var.sqrt() * (xt - a * mu) / denom  # E[ε | x_t]
        x0 = mu + a * s2 * (xt - a * mu) / denom  # E[x_0 | x_t]
        out = {"eps": eps, "x0": x0, "v": a * eps - var.sqrt() * x0}[self.prediction]  # v is linear in both
        return out.to(x.dtype).to(x.device)
