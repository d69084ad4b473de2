"""Gaussian mixtures and quadratic rewards: everything the lab needs in closed form.

With a Gaussian-mixture base p and a quadratic reward r(x) = bᵀx − ½ xᵀAx (A symmetric PSD), the KL-regularised
optimum p*(x) ∝ p(x)·exp(r(x)/α) is again a Gaussian mixture (each component is tilted by a Gaussian factor), and
under the forward process x_t = √ᾱ x₀ + √(1−ᾱ) ε every mixture stays a mixture. So the exact noise prediction
ε*(x, t) = −√(1−ᾱ_t) ∇ log p_t(x) of the base, of every basis target and of every mixed-reward target is closed
form. All arithmetic is float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class QuadraticReward:
    """r(x) = bᵀx − ½ xᵀAx with A symmetric. A basis reward needs A ⪰ 0 (scenarios check it); a mix Σ w_i r_i may
    have any A for which the tilt stays normalisable (:meth:`GaussianMixture.tilted` checks that)."""

    b: torch.Tensor  # (d,)
    A: torch.Tensor  # (d, d)

    @classmethod
    def linear(cls, b) -> QuadraticReward:
        b = torch.as_tensor(b, dtype=DTYPE)
        return cls(b, torch.zeros(len(b), len(b), dtype=DTYPE))

    def __post_init__(self):
        object.__setattr__(self, "b", torch.as_tensor(self.b, dtype=DTYPE))
        object.__setattr__(self, "A", torch.as_tensor(self.A, dtype=DTYPE))
        if self.A.shape != (len(self.b), len(self.b)):
            raise ValueError(f"reward: A has shape {tuple(self.A.shape)}, expected {(len(self.b), len(self.b))}")
        if not torch.allclose(self.A, self.A.T):
            raise ValueError("reward: A must be symmetric")

    @property
    def concave(self) -> bool:
        """A ⪰ 0: exp(r/α) tilts every Gaussian into a Gaussian."""
        return bool(torch.linalg.eigvalsh(self.A).min() >= -1e-12)

    @property
    def dim(self) -> int:
        return len(self.b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(DTYPE)
        return x @ self.b - 0.5 * torch.einsum("ni,ij,nj->n", x, self.A, x)

    def scaled(self, factor: float) -> QuadraticReward:
        return QuadraticReward(self.b * factor, self.A * factor)

    def __add__(self, other: QuadraticReward) -> QuadraticReward:
        return QuadraticReward(self.b + other.b, self.A + other.A)

    def expectation(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """E[r(x)] for x ~ N(mean, cov): bᵀm − ½ (tr(A·cov) + mᵀAm); batched over leading dimensions."""
        quadratic = torch.einsum("ij,...ji->...", self.A, cov) + torch.einsum("...i,ij,...j->...", mean, self.A, mean)
        return mean @ self.b - 0.5 * quadratic


def weighted_reward(rewards: dict[str, QuadraticReward], weights: dict[str, float]) -> QuadraticReward:
    """Σ w_i r_i (a quadratic reward again; negative weights allowed)."""
    b = sum(rewards[name].b * weight for name, weight in weights.items())
    A = sum(rewards[name].A * weight for name, weight in weights.items())
    return QuadraticReward(b, A)


@dataclass(frozen=True)
class GaussianMixture:
    """p(x) = Σ_k π_k N(x; μ_k, Σ_k)."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, d)
    covs: torch.Tensor  # (K, d, d)

    def __post_init__(self):
        for name in ("weights", "means", "covs"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name), dtype=DTYPE))
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(
                f"mixture: weights {tuple(self.weights.shape)}, means {(k, d)} and covariances "
                f"{tuple(self.covs.shape)} do not agree"
            )
        if (self.weights < 0).any() or not math.isclose(float(self.weights.sum()), 1.0, abs_tol=1e-9):
            raise ValueError("mixture: weights must be non-negative and sum to 1")
        if torch.linalg.eigvalsh(self.covs).min() <= 0:
            raise ValueError("mixture: covariances must be positive definite")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @functools.cached_property
    def precisions(self) -> torch.Tensor:
        return torch.linalg.inv(self.covs)

    @functools.cached_property
    def log_dets(self) -> torch.Tensor:
        return torch.logdet(self.covs)

    def _components(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_k + log N(x; μ_k, Σ_k) of shape (N, K), and the pulls Σ_k⁻¹ (μ_k − x) of shape (N, K, d).

        Written with broadcasts rather than batched matmuls: for the lab's small d they are several times faster."""
        diff = self.means[None] - x.to(DTYPE)[:, None, :]  # (N, K, d)
        pulls = (self.precisions[None] * diff[:, :, None, :]).sum(-1)
        mahalanobis = (diff * pulls).sum(-1)
        log_normal = -0.5 * (mahalanobis + self.log_dets + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights) + log_normal, pulls

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (N, d)."""
        return torch.logsumexp(self._components(x)[0], dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇ log p(x) = Σ_k γ_k(x) · Σ_k⁻¹ (μ_k − x), γ the posterior responsibilities; shape (N, d)."""
        log_probs, pulls = self._components(x)
        return (torch.softmax(log_probs, dim=1)[..., None] * pulls).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[components] + (chol[components] @ noise[..., None])[..., 0]

    def diffused(self, alpha_bar: float) -> GaussianMixture:
        """The law of x_t = √ᾱ x₀ + √(1−ᾱ) ε: means √ᾱ μ_k, covariances ᾱ Σ_k + (1−ᾱ) I."""
        eye = torch.eye(self.dim, dtype=DTYPE)
        return GaussianMixture(
            self.weights, math.sqrt(alpha_bar) * self.means, alpha_bar * self.covs + (1 - alpha_bar) * eye
        )

    def tilted(self, reward: QuadraticReward, alpha: float) -> GaussianMixture:
        """p*(x) ∝ p(x)·exp(r(x)/α), component by component:

        Σ'_k = (Σ_k⁻¹ + A/α)⁻¹,  μ'_k = Σ'_k (Σ_k⁻¹ μ_k + b/α),
        π'_k ∝ π_k · √(|Σ'_k| / |Σ_k|) · exp(½ μ'_kᵀ Σ'_k⁻¹ μ'_k − ½ μ_kᵀ Σ_k⁻¹ μ_k).
        """
        if alpha <= 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        precisions = torch.linalg.inv(self.covs)
        new_precisions = precisions + reward.A / alpha
        if torch.linalg.eigvalsh(new_precisions).min() <= 0:
            raise ValueError(f"p·exp(r/α) is not normalisable: Σ_k⁻¹ + A/α is not positive definite (α = {alpha:g})")
        covs = torch.linalg.inv(new_precisions)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        shifts = (precisions @ self.means[..., None])[..., 0] + reward.b / alpha  # Σ⁻¹μ + b/α
        means = (covs @ shifts[..., None])[..., 0]
        log_normalisers = (
            0.5 * (torch.logdet(covs) - torch.logdet(self.covs))
            + 0.5 * torch.einsum("ki,ki->k", means, shifts)
            - 0.5 * torch.einsum("ki,kij,kj->k", self.means, precisions, self.means)
        )
        log_weights = torch.log(self.weights) + log_normalisers
        if not all(bool(torch.isfinite(value).all()) for value in (covs, means, log_normalisers)):
            raise ValueError(
                f"p·exp(r/α) with α = {alpha:g} is beyond float64's closed form (the tilt overflows): use a weaker "
                "reward or a larger α"
            )
        return GaussianMixture(torch.softmax(log_weights, dim=0), means, covs)

    def expected(self, reward: QuadraticReward) -> float:
        """E_p[r(x)], exactly."""
        return float((self.weights * reward.expectation(self.means, self.covs)).sum())
