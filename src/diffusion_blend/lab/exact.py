"""Exact denoisers: plain torch modules (x_t, t) → ε*(x_t, t) for a Gaussian-mixture data law.

They are called like any diffusers denoiser, so the lab runs the product's own code path — ``BlendedDenoiser`` and
real diffusers schedulers — with the ground truth in place of a trained network.
"""

from __future__ import annotations

import torch
from torch import nn

from .mixture import DTYPE, GaussianMixture


class ExactDenoiser(nn.Module):
    """ε*(x, t) = −√(1−ᾱ_t) ∇ log p_t(x) for the mixture ``target`` under the noise schedule ``alphas_cumprod``.

    Timesteps between the integers (Euler-type schedulers) use ᾱ from the σ = √((1−ᾱ)/ᾱ) interpolated linearly in
    t, as diffusers' discrete-time schedulers do.
    """

    def __init__(self, target: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", target.weights.clone())
        self.register_buffer("means", target.means.clone())
        self.register_buffer("covs", target.covs.clone())
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).to(DTYPE).sqrt())
        self._noised: dict[float, GaussianMixture] = {}

    @property
    def target(self) -> GaussianMixture:
        return GaussianMixture(self.weights, self.means, self.covs)

    def alpha_bar(self, timestep: torch.Tensor | float) -> float:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        low = min(int(t), len(self.sigmas) - 1)
        high = min(low + 1, len(self.sigmas) - 1)
        sigma = self.sigmas[low] + (t - low) * (self.sigmas[high] - self.sigmas[low])
        return float(1 / (1 + sigma**2))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """ε* at one timestep for the whole batch, or at one timestep per row (a tensor of the batch's length)."""
        timesteps = torch.as_tensor(timestep).reshape(-1)
        if len(timesteps) > 1 and bool((timesteps != timesteps[0]).any()):
            return self._per_row(sample, timesteps)
        alpha_bar = self.alpha_bar(timesteps[0])
        score = self.noised(alpha_bar).score(sample)
        return (-((1 - alpha_bar) ** 0.5) * score).to(sample.dtype)

    def _per_row(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ε* with a noise level per row: the diffused mixture's score with per-row means √ᾱ μ_k and covariances
        ᾱ Σ_k + (1 − ᾱ) I, in one batched computation."""
        if len(timesteps) != len(sample):
            raise ValueError(f"{len(timesteps)} timesteps for {len(sample)} rows")
        values, inverse = timesteps.unique(return_inverse=True)
        alpha_bars = torch.tensor([self.alpha_bar(value) for value in values], dtype=DTYPE)[inverse][:, None, None]
        eye = torch.eye(self.means.shape[1], dtype=DTYPE)
        covs = alpha_bars[..., None] * self.covs[None] + (1 - alpha_bars[..., None]) * eye  # (N, K, d, d)
        diff = alpha_bars.sqrt() * self.means[None] - sample.to(DTYPE)[:, None, :]  # (N, K, d)
        pulls = torch.linalg.solve(covs, diff)
        log_probs = torch.log(self.weights) - 0.5 * ((diff * pulls).sum(-1) + torch.logdet(covs))
        score = (torch.softmax(log_probs, dim=1)[..., None] * pulls).sum(1)
        return (-(1 - alpha_bars[:, :, 0]).sqrt() * score).to(sample.dtype)

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The data law at noise level ᾱ (kept per level: a sampler visits the same levels for every method)."""
        if alpha_bar not in self._noised:
            self._noised[alpha_bar] = self.target.diffused(alpha_bar)
        return self._noised[alpha_bar]
