"""Reward-gradient guidance: the base's stochastic step, its mean moved up the weighted reward of x̂₀.

At step k, from x_t, the base predicts and the sample's Tweedie estimate x̂₀(x_t) follows; each reward's gradient
g_i = ∇_{x̂₀} r_i(x̂₀) is normalised per sample to unit root-mean-square (rewards on different scales then pull
alike, and the weights decide), combined as Σ_i w_i ĝ_i, and carried back to x_t through the denoiser's Jacobian
(DPS, Chung et al. 2023; ``through_denoiser=False`` is the cheap form that treats the prediction as constant, so only
x̂₀'s explicit dependence on x_t remains). The result, normalised again, moves the step's mean:

    x_{t−1} = μ_base(x_t) + ``scale`` · γ_k · σ_k · d  +  σ_k ε,      γ_k = √ᾱ_{t_k}

— a shift in units of the step's own noise, tempered by the signal level √ᾱ (x̂₀ is a blur early on, its reward's
gradient meaningless). A reward with no gradient (a black box) gets a zeroth-order estimate at x̂₀: Gaussian
smoothing with ``probes`` antithetic pairs, g ≈ Σ_m (r(x̂₀ + δz_m) − r(x̂₀ − δz_m)) z_m / (2 δ · probes), its
directions z drawn from a generator of their own (``probe_seed``) so that the images' noise is the base sampler's.
``scale = 0`` is the base sampler, draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampler import BaseSampler, check_weights

SCALE, PROBES, PROBE_SIZE = 0.1, 8, 0.1
#: keeps a per-sample normalisation finite where a gradient vanishes
NORM_FLOOR = 1e-12


def guided_sample(
    sampler: BaseSampler,
    generators: Sequence[torch.Generator],
    weights: torch.Tensor,
    *,
    scale: float = SCALE,
    through_denoiser: bool = True,
    probes: int = PROBES,
    probe_size: float = PROBE_SIZE,
    probe_seed: int = 0,
) -> torch.Tensor:
    """Samples of reward-gradient guidance for each image's ``weights`` row ([images, rewards])."""
    check_guidance_options(scale, probes, probe_size)
    weights = check_weights(weights, len(generators), len(sampler.differentiable))
    x = sampler.initial(generators)
    rows = torch.arange(len(generators), device=x.device)
    probing = Probes(torch.Generator().manual_seed(probe_seed), probes, probe_size)
    for index, step in enumerate(sampler.path.steps):
        steer = scale > 0 and not step.deterministic
        with torch.enable_grad() if steer else torch.no_grad():
            x_in = x.detach().requires_grad_(steer and through_denoiser)
            out = sampler.predict(x_in, step.timestep, rows)
            if steer:
                shift = (
                    scale
                    * math.sqrt(step.alpha_bar)
                    * step.sigma
                    * direction(sampler, step, x_in, out, rows, weights, through_denoiser, probing)
                )
                out = out.detach()
        with torch.no_grad():
            x = sampler.step(index, x, out, sampler.noise(generators, 1))
            if steer:
                x = x + shift
    return x.detach()


def direction(
    sampler: BaseSampler,
    step,
    x: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    through_denoiser: bool,
    probing: Probes,
) -> torch.Tensor:
    """d: Σ_i w_i ĝ_i at x̂₀, carried back to x_t, per sample of unit root-mean-square."""
    clean = step.clean(x, out if through_denoiser else out.detach())
    at_clean = clean.detach()
    gradients = [reward_gradient(sampler, at_clean, rows, i, probing) for i in range(len(sampler.differentiable))]
    combined = sum(
        weights[rows, i].to(at_clean).view(-1, *[1] * (x.dim() - 1)) * unit_rms(gradient)
        for i, gradient in enumerate(gradients)
    )
    if through_denoiser:
        combined = torch.autograd.grad(clean, x, grad_outputs=combined)[0]
    else:
        combined = step.clean_x * combined
    return unit_rms(combined.detach())


def reward_gradient(
    sampler: BaseSampler, clean: torch.Tensor, rows: torch.Tensor, reward: int, probing: Probes
) -> torch.Tensor:
    """∇_{x̂₀} r_i(x̂₀): by autograd where the reward is differentiable, by antithetic Gaussian smoothing if not."""
    if sampler.differentiable[reward]:
        point = clean.detach().requires_grad_(True)
        value = sampler.rewards(point, rows)[:, reward].sum()
        return torch.autograd.grad(value, point)[0]
    probes, size = probing.count, probing.size
    with torch.no_grad():
        directions = torch.randn(
            (len(rows) * probes, *clean.shape[1:]), generator=probing.generator, dtype=clean.dtype
        ).to(clean.device)
        repeated = clean.repeat_interleave(probes, dim=0)
        many = rows.repeat_interleave(probes)
        up = sampler.rewards(repeated + size * directions, many)[:, reward]
        down = sampler.rewards(repeated - size * directions, many)[:, reward]
        change = (up - down).to(clean).view(-1, *[1] * (clean.dim() - 1))
        estimate = (change * directions).view(len(rows), probes, *clean.shape[1:]).sum(1)
        return estimate / (2 * size * probes)


@dataclass(frozen=True)
class Probes:
    """The zeroth-order estimate's directions: ``count`` antithetic pairs of size ``size`` per sample."""

    generator: torch.Generator
    count: int
    size: float


def unit_rms(gradient: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient scaled to root-mean-square 1 (0 stays 0)."""
    rms = gradient.flatten(1).pow(2).mean(1).sqrt().clamp_min(NORM_FLOOR)
    return gradient / rms.view(-1, *[1] * (gradient.dim() - 1))


def check_guidance_options(scale: float, probes: int, probe_size: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"guidance probes must be a positive integer, got {probes!r}")
    if not (isinstance(probe_size, (int, float)) and math.isfinite(probe_size) and probe_size > 0):
        raise ValueError(f"guidance probe size must be a finite number > 0, got {probe_size!r}")
