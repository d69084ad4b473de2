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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..finetune.path import Step, StochasticPath

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
    #: in a pipeline (``Blend.blend(..., corrector=SMC(...))``): basis name → reward(images, prompts) → [images], for
    #: every basis the blend weighs, and α, the KL weight the basis models were fine-tuned with
    rewards: Mapping[str, Callable] | None = field(default=None, compare=False)
    alpha: float | None = None

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
        if self.alpha is not None:
            check_alpha(self.alpha)


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
    device = generator.device if generator is not None else None  # (a CUDA generator draws on its device)
    offsets = torch.rand(groups, 1, generator=generator, dtype=torch.float64, device=device).cpu()
    positions = (offsets + torch.arange(count, dtype=torch.float64)) / count
    return torch.searchsorted(cumulative, positions, right=True).clamp_max(count - 1)


def effective_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """(Σw)² / (K Σw²) per group: 1 for equal weights, 1/K for one particle holding all."""
    weights = torch.softmax(log_weights, dim=1)
    return 1.0 / (weights.pow(2).sum(1) * log_weights.shape[1])


class Particles:
    """K particles for each of ``samples`` samples as rows (sample s's are rows sK … sK + K − 1), with their float64
    log-weights and potentials: what one corrected sampling run carries from step to step.

    ``log_target(x̂₀)`` is λ Σ_i w_i r_i(x̂₀) / α per row (float64, on the host); ``generators`` is one generator
    (None: torch's global one), or one per sample (each sample's resampling and final choice then draw from its own,
    whatever the batch).
    """

    def __init__(
        self,
        samples: int,
        options: SMC,
        log_target: Callable[[torch.Tensor], torch.Tensor],
        generators: torch.Generator | Sequence[torch.Generator] | None,
    ):
        if isinstance(generators, Sequence) and len(generators) != samples:
            raise ValueError(f"SMC: give one generator, or one per sample ({samples}), got {len(generators)}")
        self.samples, self.count, self.options = samples, options.particles, options
        self.log_target, self.generators = log_target, generators
        self.log_weights = torch.zeros(samples, self.count, dtype=torch.float64)
        self.log_psi = torch.zeros(samples * self.count, dtype=torch.float64)
        self.log_normaliser = torch.zeros(samples, dtype=torch.float64)
        self.index = 0
        self.trace = Trace()

    def reweigh(self, step: Step, x: torch.Tensor, out_base: torch.Tensor) -> torch.Tensor | None:
        """Before step ``step`` from x: the potential's change on the base's x̂₀ (every ``potential_every`` steps),
        then systematic resampling of the groups whose ESS fell below the threshold. Returns the new order of the
        rows (None: unchanged); the caller reorders whatever it keeps per row with it."""
        index, self.index = self.index, self.index + 1
        if index % self.options.potential_every:
            self.trace.ess.append(float(effective_fraction(self.log_weights).mean()))
            return None
        gamma = 1.0 if self.options.tempering == "none" else math.sqrt(step.alpha_bar)
        self._potential(step.clean(x, out_base), gamma)
        ess = effective_fraction(self.log_weights)
        self.trace.ess.append(float(ess.mean()))
        chosen = ess < self.options.ess_threshold
        if not bool(chosen.any()):
            return None
        self.log_normaliser[chosen] += torch.logsumexp(self.log_weights[chosen], 1) - math.log(self.count)
        picks = torch.arange(self.samples * self.count).view(self.samples, self.count)
        groups = chosen.nonzero()[:, 0]
        picks[groups] = self._draw(groups, systematic_resample) + (groups * self.count)[:, None]
        order = picks.flatten()
        self.log_psi = self.log_psi[order]
        self.log_weights[chosen] = 0.0
        self.trace.resampled[index] = int(chosen.sum())
        return order

    def move(self, step: Step, x: torch.Tensor, out: torch.Tensor, out_base: torch.Tensor) -> torch.Tensor:
        """x_{t−1}: the blend's Gaussian step, the weights times p/q of the move; a deterministic step (σ = 0) moves
        with the base's prediction at no weight."""
        self.trace.denoiser_calls += 1
        if step.deterministic:
            return step.mean(x, out_base)
        noise = randn_tensor(x.shape, generator=self._per_row(self.generators), device=x.device, dtype=x.dtype)
        ratio = transition_log_ratio(step.control(out, out_base), noise).cpu()
        self.log_weights += ratio.view(self.samples, self.count)
        return step.sample(step.mean(x, out), noise)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """At x₀: the exact potential, the log normalising constant, and one particle per sample drawn by its
        final weight; returns the chosen rows."""
        self._potential(x, 1.0)
        self.log_normaliser += torch.logsumexp(self.log_weights, 1) - math.log(self.count)
        self.trace.log_normaliser = self.log_normaliser

        def choose(log_weights, generator):
            device = generator.device if generator is not None else None
            return torch.multinomial(torch.softmax(log_weights, 1).to(device), 1, generator=generator).cpu()

        chosen = self._draw(torch.arange(self.samples), choose)[:, 0]
        return torch.arange(self.samples) * self.count + chosen

    def _potential(self, clean: torch.Tensor, gamma: float) -> None:
        self.trace.reward_calls += 1
        new = gamma * self.log_target(clean).detach()
        self.log_weights += (new - self.log_psi).view(self.samples, self.count)
        self.log_psi = new

    def _draw(self, groups: torch.Tensor, draw: Callable) -> torch.Tensor:
        """``draw(log_weights, generator)`` for the given groups: at once with one generator, else group by group."""
        if not isinstance(self.generators, Sequence):
            return draw(self.log_weights[groups], self.generators)
        return torch.cat(
            [draw(self.log_weights[group : group + 1], self.generators[group]) for group in groups.tolist()]
        )

    def _per_row(self, generators):
        """The generator of each row (a sample's K rows draw one after another from its generator)."""
        if not isinstance(generators, Sequence):
            return generators
        return [generator for generator in generators for _ in range(self.count)]


def smc_sample(
    path: StochasticPath,
    predict: Predict,
    rewards: Rewards,
    weights: torch.Tensor,
    *,
    alpha: float,
    start: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
    options: SMC = SMC(),
    kl_scale: float = 1.0,
) -> tuple[torch.Tensor, Trace]:
    """One sample per row of ``start`` (x_T), each from a group of ``options.particles`` particles moved by the
    blend (``predict``'s first output) and weighted towards p_base·exp(λ Σ_i w_i r_i / α); ``weights`` [rewards]
    or [samples, rewards]; ``generator`` one, or one per sample. Returns the samples and the :class:`Trace`."""
    if not path.stochastic:
        raise ValueError("SMC reweights Gaussian steps: use a stochastic sampler (DDPM, or DDIM with eta > 0)")
    check_alpha(alpha)
    samples, count = len(start), options.particles
    weights = torch.as_tensor(weights, dtype=torch.float64).expand(samples, -1).repeat_interleave(count, 0)

    def log_target(clean: torch.Tensor) -> torch.Tensor:
        values = checked_rewards(rewards(clean), weights.shape)
        return kl_scale * (values * weights.to(values.device)).sum(1).cpu() / alpha

    particles = Particles(samples, options, log_target, generator)
    x = start.repeat_interleave(count, dim=0)
    for step in path.steps:
        out, out_base = predict(x, step.timestep)
        order = particles.reweigh(step, x, out_base)
        if order is not None:
            x, out, out_base = x[order], out[order], out_base[order]
        x = particles.move(step, x, out, out_base)
    return x[particles.finish(x)], particles.trace


def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"SMC alpha (the basis models' KL weight) must be a finite number > 0, got {alpha!r}")


def checked_rewards(values, shape: torch.Size) -> torch.Tensor:
    """Rewards [rows, rewards] as float64, refused where their shape is not the expected one or a value not finite."""
    if not isinstance(values, torch.Tensor) or values.shape != shape:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"SMC: the rewards must give [rows, rewards] = {list(shape)} values, got {got}")
    if not torch.isfinite(values).all():
        raise ValueError("SMC: a reward returned a non-finite value; the corrector cannot weigh that sample")
    return values.double()
