"""Sequential Monte Carlo with the blend as proposal: closing the blend's gap to the exact target at inference.

The blend approximates the model fine-tuned for the mix; when the rewards can be evaluated, the exact target

    π(x₀) ∝ p_base(x₀) · exp(λ Σ_i w_i r_i(x₀) / α)

is known up to a constant, and particles moved by the blended sampler can be reweighted towards it (Feynman–Kac
steering; Del Moral 2004, Wu et al. 2023 "twisted diffusion sampler", Singhal et al. 2025 "FK steering"). Along a
stochastic sampler (DDPM, DDIM η > 0) each step is Gaussian, x_{t−1} = μ_q + σ_t ε under the blend q and
N(μ_p, σ_t²) under the base p, so with u = (μ_q − μ_p)/σ_t (the path's control) the incremental log-weight of a move
is exactly

    log p(x_{t−1} | x_t) − log q(x_{t−1} | x_t) = −uᵀε − ½‖u‖²,

plus the change of a potential ψ_t(x_t) = exp(γ_t λ Σ_i w_i r_i(x̂₀(x_t)) / α) on the base's Tweedie estimate x̂₀,
with γ = 1 at the end (ψ₀ is the exact tilt: the particles' weighted law is π whatever ψ_t was before). For a
Gaussian base and linear rewards this ψ_t is the exact twist E_p[exp(r(x₀)/α) | x_t] up to a constant, and the
blend the exact tilted sampler, so the weights stay nearly uniform (tested). Log-weights accumulate in float64
between resamplings; a group of K particles is resampled systematically when its effective sample size falls
below ``ess_threshold`` · K, and the log normalising constant log E_p[exp(λ Σ w r / α)] is estimated on the way.
A deterministic step (σ = 0, such as DDIM's last) moves particles with the base's prediction: no weight changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .finetune.path import StochasticPath

TEMPERING = ("none", "sqrt_alpha_bar")
#: (x, timestep) → (the blend's prediction, the base's prediction), one batched call for both where possible
Predict = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
#: x̂₀ → each reward of each row, [rows, rewards]
Rewards = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SMC:
    """The corrector's settings: ``particles`` per requested sample; resample a group when its ESS falls below
    ``ess_threshold`` · particles; evaluate the potential every ``potential_every`` steps (resampling is considered
    only then; the weights telescope, so skipped evaluations lose nothing); ``tempering`` γ_t of the potential."""

    particles: int = 8
    ess_threshold: float = 0.5
    potential_every: int = 1
    tempering: str = "none"

    def __post_init__(self):
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"SMC particles must be a positive integer, got {self.particles!r}")
        if not (isinstance(self.ess_threshold, (int, float)) and 0 <= self.ess_threshold <= 1):
            raise ValueError(f"SMC ess_threshold must lie in [0, 1], got {self.ess_threshold!r}")
        if (
            isinstance(self.potential_every, bool)
            or not isinstance(self.potential_every, int)
            or self.potential_every < 1
        ):
            raise ValueError(f"SMC potential_every must be a positive integer, got {self.potential_every!r}")
        if self.tempering not in TEMPERING:
            raise ValueError(f"SMC tempering must be one of {', '.join(TEMPERING)}, got {self.tempering!r}")


@dataclass
class Trace:
    """What a corrected run did: the mean ESS fraction over groups at each step (before any resampling), the steps
    at which some group resampled and how many, the log normalising-constant estimate per sample, the calls."""

    ess: list[float] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)
    log_normaliser: torch.Tensor | None = None
    denoiser_calls: int = 0
    reward_calls: int = 0

    def describe(self) -> dict:
        return {
            "ess": self.ess,
            "resampled": self.resampled,
            "denoiser_calls": self.denoiser_calls,
            "reward_calls": self.reward_calls,
            "log_normaliser": None if self.log_normaliser is None else self.log_normaliser.tolist(),
        }


def transition_log_ratio(control: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """log p(x′ | x) − log q(x′ | x) for x′ = μ_q + σε, u = (μ_q − μ_p)/σ: −uᵀε − ½‖u‖² per row, in float64."""
    control, noise = control.flatten(1).double(), noise.flatten(1).double()
    return -(control * noise).sum(1) - 0.5 * control.pow(2).sum(1)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of K draws from each row's weights ∝ exp(log_weights) [groups, K]: one uniform u per row, the
    draws at (u + j)/K, j = 0..K−1, through the cumulative weights (Carpenter, Clifford & Fearnhead 1999)."""
    groups, count = log_weights.shape
    weights = torch.softmax(log_weights.double(), dim=1)
    cumulative = weights.cumsum(1)
    cumulative[:, -1] = 1.0  # no draw may fall past the last particle by rounding
    offsets = torch.rand(groups, 1, generator=generator, dtype=torch.float64)
    positions = (offsets + torch.arange(count, dtype=torch.float64)) / count
    return torch.searchsorted(cumulative, positions, right=True).clamp_max(count - 1)


def effective_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """(Σw)² / (K Σw²) per group: 1 for equal weights, 1/K for one particle holding all."""
    weights = torch.softmax(log_weights, dim=1)
    return 1.0 / (weights.pow(2).sum(1) * log_weights.shape[1])


def smc_sample(
    path: StochasticPath,
    predict: Predict,
    rewards: Rewards,
    weights: torch.Tensor,
    *,
    alpha: float,
    start: torch.Tensor,
    generator: torch.Generator,
    options: SMC = SMC(),
    kl_scale: float = 1.0,
) -> tuple[torch.Tensor, Trace]:
    """One sample per row of ``start`` (x_T), each from a group of ``options.particles`` particles moved by the
    blend (``predict``'s first output) and weighted towards p_base·exp(λ Σ_i w_i r_i / α); ``weights`` [rewards]
    or [samples, rewards]. Returns the samples and the :class:`Trace`."""
    if not path.stochastic:
        raise ValueError("SMC reweights Gaussian steps: use a stochastic sampler (DDPM, or DDIM with eta > 0)")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    samples, count = len(start), options.particles
    weights = torch.as_tensor(weights, dtype=torch.float64).expand(samples, -1).repeat_interleave(count, 0)
    trace = Trace()

    def potential(clean: torch.Tensor, gamma: float) -> torch.Tensor:
        trace.reward_calls += 1
        values = rewards(clean)
        if not isinstance(values, torch.Tensor) or values.shape != weights.shape:
            raise ValueError(
                f"SMC: the rewards must give [rows, rewards] = {list(weights.shape)} values, got "
                f"{list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if not torch.isfinite(values).all():
            raise ValueError("SMC: a reward returned a non-finite value; the corrector cannot weigh that sample")
        values = values.double().to(weights.device)
        return gamma * kl_scale * (values * weights.to(values.device)).sum(1).cpu() / alpha

    x = start.repeat_interleave(count, dim=0)
    log_weights = torch.zeros(samples, count, dtype=torch.float64)
    log_psi = torch.zeros(samples * count, dtype=torch.float64)
    log_normaliser = torch.zeros(samples, dtype=torch.float64)
    steps = path.steps
    for index, step in enumerate(steps):
        out_q, out_p = predict(x, step.timestep)
        trace.denoiser_calls += 1
        if index % options.potential_every == 0:
            gamma = 1.0 if options.tempering == "none" else math.sqrt(step.alpha_bar)
            new = potential(step.clean(x, out_p), gamma)
            log_weights += (new - log_psi).view(samples, count)
            log_psi = new
            ess = effective_fraction(log_weights)
            trace.ess.append(float(ess.mean()))
            chosen = ess < options.ess_threshold
            if bool(chosen.any()):
                log_normaliser[chosen] += torch.logsumexp(log_weights[chosen], 1) - math.log(count)
                picks = torch.arange(samples * count).view(samples, count)
                picks[chosen] = (
                    systematic_resample(log_weights[chosen], generator)
                    + (torch.arange(samples)[chosen] * count)[:, None]
                )
                order = picks.flatten()
                x, out_q, out_p, log_psi = x[order], out_q[order], out_p[order], log_psi[order]
                log_weights[chosen] = 0.0
                trace.resampled[index] = int(chosen.sum())
        else:
            trace.ess.append(float(effective_fraction(log_weights).mean()))
        if step.deterministic:
            x = step.mean(x, out_p)
            continue
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = step.sample(step.mean(x, out_q), noise)
        log_weights += transition_log_ratio(step.control(out_q, out_p), noise).cpu().view(samples, count)
    final = potential(x, 1.0)
    log_weights += (final - log_psi).view(samples, count)
    log_normaliser += torch.logsumexp(log_weights, 1) - math.log(count)
    trace.log_normaliser = log_normaliser
    chosen = torch.multinomial(torch.softmax(log_weights, 1), 1, generator=generator)[:, 0]
    return x[torch.arange(samples) * count + chosen], trace
