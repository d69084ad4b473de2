"""The stochastic sampling path that fine-tuning regularises: Gaussian transitions and their exact KL.

A DDPM or DDIM (η > 0) sampler moves x_t to x_{t−1} ~ N(μ(x_t, out), σ_t² I), where ``out`` is the denoiser's
prediction (ε, v or x₀) and the mean is affine in it (DDIM, Song et al. 2021, eq. 12):

    x̂₀, ε̂ = the prediction read as a clean sample and as noise (both affine in x_t and out)
    μ = √ᾱ_{t−1} x̂₀ + √(1 − ᾱ_{t−1} − σ_t²) ε̂,   σ_t = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1})

η = 1 is DDPM's posterior (``fixed_small`` variance). So μ = a_t x_t + k_t out, and a fine-tuned denoiser differs
from the base by a control u = k_t (out_θ − out_base) / σ_t in units of the step's noise: μ_θ = μ_base + σ_t u and

    KL(N(μ_θ, σ_t²) ‖ N(μ_base, σ_t²)) = ‖u‖² / 2      (summed over dimensions).

A step with σ_t = 0 (the last step of DDIM towards ᾱ = 1) carries no KL and would let a model move samples for
free: fine-tuned samplers take the base's prediction there (:meth:`Step.deterministic`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: σ_t below this counts as a deterministic step (DDPM clamps its last variance to 1e-20, σ = 1e-10).
DETERMINISTIC_SIGMA = 1e-6
#: √ᾱ at the first timestep above this: the start x_T still depends on the sample (the schedule is not memoryless).
MEMORYLESS_TOLERANCE = 0.01


@dataclass(frozen=True)
class Step:
    """One transition x_t → x_{t−1}: mean = ``x_coef`` · x_t + ``out_coef`` · out, noise standard deviation
    ``sigma``; the prediction read as a clean sample (Tweedie's estimate) is x̂₀ = ``clean_x`` · x_t + ``clean_out`` ·
    out."""

    timestep: int
    alpha_bar: float  # ᾱ_t
    alpha_bar_prev: float  # ᾱ_{t−1}
    x_coef: float
    out_coef: float
    sigma: float
    clean_x: float
    clean_out: float

    @property
    def deterministic(self) -> bool:
        return self.sigma < DETERMINISTIC_SIGMA

    def mean(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.x_coef * x + self.out_coef * out

    def clean(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x̂₀, the denoiser's estimate of E[x₀ | x_t]."""
        return self.clean_x * x + self.clean_out * out

    def control(self, out: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """u = k_t (out − out_base) / σ_t: the mean's change in units of the step's noise."""
        return self.out_coef * (out - base_out) / self.sigma

    def sample(self, mean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return mean if self.deterministic else mean + self.sigma * noise


def kl(control: torch.Tensor) -> torch.Tensor:
    """The exact KL of the fine-tuned transition from the base's, ‖u‖²/2 summed over every dimension but the batch."""
    return 0.5 * control.flatten(1).pow(2).sum(1)


def gaussian_log_ratio(noise: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """log N(x_{t−1}; μ_base + σu, σ²) − log N(x_{t−1}; μ_base, σ²) for x_{t−1} = μ_base + σ·noise: uᵀnoise − ‖u‖²/2."""
    return (control * noise).flatten(1).sum(1) - kl(control)


def _prediction_coefficients(prediction_type: str, alpha_bar: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """x̂₀ = c₀ₓ x + c₀ₒ out and ε̂ = cₑₓ x + cₑₒ out, as ((c₀ₓ, c₀ₒ), (cₑₓ, cₑₒ))."""
    root, rest = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (1 / root, -rest / root), (0.0, 1.0)
    if prediction_type == "v_prediction":
        return (root, -rest), (rest, root)
    if prediction_type == "sample":
        return (0.0, 1.0), (1 / rest, -root / rest)
    raise ValueError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


@dataclass(frozen=True)
class StochasticPath:
    """The transitions of a DDPM/DDIM sampler with ``steps`` steps and noise level ``eta`` (1: DDPM's posterior)."""

    steps: tuple[Step, ...]
    prediction_type: str
    eta: float
    init_alpha_bar: float  # ᾱ at the first timestep: x_T is N(0, I) only where it is ≈ 0

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float = 1.0) -> StochasticPath:
        """Read the schedule of a diffusers ``DDIMScheduler`` or ``DDPMScheduler`` (its timestep spacing, its
        prediction type); raise where its step is not this Gaussian transition (sample clipping or thresholding,
        a variance type other than DDPM's ``fixed_small``)."""
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            raise ValueError(
                f"fine-tuning samples with DDIM or DDPM (a Gaussian step of known variance), got "
                f"{type(scheduler).__name__}: build one with DDIMScheduler.from_config(...)"
            )
        config = scheduler.config
        if config.get("clip_sample") or config.get("thresholding"):
            raise ValueError(
                "the scheduler clips or thresholds x̂₀, so its step is not Gaussian in the prediction: "
                "set clip_sample=False and thresholding=False"
            )
        if isinstance(scheduler, DDPMScheduler):
            if config.get("variance_type", "fixed_small") != "fixed_small":
                raise ValueError(f"DDPM variance {config.variance_type!r}: fine-tuning needs 'fixed_small'")
            eta = 1.0
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"steps must be a positive integer, got {num_steps!r}")
        if not (math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        prediction_type = config.prediction_type
        _prediction_coefficients(prediction_type, 0.5)  # raises on an unknown type
        scheduler.set_timesteps(num_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        alphas = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod) if isinstance(scheduler, DDIMScheduler) else 1.0
        if isinstance(scheduler, DDIMScheduler):
            previous = [t - config.num_train_timesteps // num_steps for t in timesteps]
        else:
            previous = [*timesteps[1:], -1]
        steps = tuple(
            _step(t, float(alphas[t]), float(alphas[p]) if p >= 0 else final, prediction_type, eta)
            for t, p in zip(timesteps, previous)
        )
        return cls(steps, prediction_type, eta, float(alphas[timesteps[0]]))

    @property
    def stochastic(self) -> bool:
        return any(not step.deterministic for step in self.steps)

    @property
    def memoryless(self) -> bool:
        """Whether x_T is (nearly) independent of the sample: only then is p_base·exp(r/α) the objective's optimum."""
        return math.sqrt(self.init_alpha_bar) <= MEMORYLESS_TOLERANCE

    def describe(self) -> dict:
        return {
            "steps": len(self.steps),
            "eta": self.eta,
            "prediction_type": self.prediction_type,
            "sqrt_alpha_bar_start": math.sqrt(self.init_alpha_bar),
            "memoryless": self.memoryless,
        }


def _step(timestep: int, alpha_bar: float, alpha_bar_prev: float, prediction_type: str, eta: float) -> Step:
    (x0_x, x0_out), (eps_x, eps_out) = _prediction_coefficients(prediction_type, alpha_bar)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    sigma = eta * math.sqrt(max(variance, 0.0))
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    root_prev = math.sqrt(alpha_bar_prev)
    return Step(
        timestep,
        alpha_bar,
        alpha_bar_prev,
        root_prev * x0_x + direction * eps_x,
        root_prev * x0_out + direction * eps_out,
        sigma,
        x0_x,
        x0_out,
    )
