"""``weighted-dsm``: denoising score matching on samples weighted towards p_base·exp(r/α).

The fine-tuned target p* ∝ p_base·exp(r/α) is the base's law reweighted, so its score can be learned off-policy:
draw samples, weight them by exp(r/α) (self-normalised), and fit the denoiser to the weighted set by denoising
score matching — its minimiser is the score of p* wherever the weights are exact. Where exp(r/α) is too peaked
for one reweighting (few samples carry the weight), the tilt is tempered as in SMC samplers (Del Moral et al. 2006):
each round samples the current model, which approximates p_base·exp(β r), and reweights by exp(Δβ r) with the
largest Δβ whose effective sample size stays above ``ess`` of the round, until β = 1/α. Needs no reward gradient
and no noise in the sampler.
"""

from __future__ import annotations

import dataclasses

import torch

from .method import Method, Options
from .target import rollout

#: Bisection steps when choosing the next temperature (Δβ to within 2⁻⁴⁰ of the largest allowed).
BISECTION_STEPS = 40


@dataclasses.dataclass
class WeightedDsmOptions(Options):
    batch_size: int = 256
    #: samples drawn from the current model per tempering round (per process)
    round_samples: int = 8192
    #: optimizer updates per round before the next one samples the updated model
    round_updates: int = 300
    #: smallest effective sample size, as a fraction of the round's samples, a reweighting may leave
    ess: float = 0.3

    def check(self) -> None:
        super().check()
        if not self.ess < 1:
            raise ValueError(f"ess is a fraction of the samples and must be < 1, got {self.ess}")


def effective_sample_fraction(log_weights: torch.Tensor) -> float:
    """(Σw)² / (n Σw²) of the self-normalised weights exp(log_weights): 1 for equal weights, 1/n for one."""
    weights = torch.softmax(log_weights.double(), dim=0)
    return float(1 / (weights.pow(2).sum() * len(weights)))


def next_temperature(rewards: torch.Tensor, remaining: float, ess: float) -> float:
    """The largest Δβ ≤ ``remaining`` whose weights exp(Δβ·r) keep the effective sample fraction ≥ ``ess``."""
    if effective_sample_fraction(remaining * rewards) >= ess:
        return remaining
    low, high = 0.0, remaining
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if effective_sample_fraction(middle * rewards) >= ess else (low, middle)
    return low


class WeightedDsm(Method):
    name = "weighted-dsm"
    options_class = WeightedDsmOptions
    needs_noise = False
    state_fields = ("beta", "samples", "log_weights", "conditions", "updates_in_round", "round_ess", "round_reward")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = 0.0
        self.samples: torch.Tensor | None = None
        self.log_weights: torch.Tensor | None = None
        self.conditions = None
        self.updates_in_round = 0
        self.round_ess = 1.0
        self.round_reward = float("nan")

    @property
    def final_beta(self) -> float:
        return 1 / self.alpha

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        round_done = self.updates_in_round >= self.options.round_updates
        if self.samples is None or (round_done and self.beta < self.final_beta):
            self._new_round(generator)
        self.updates_in_round += 1
        rows = torch.multinomial(
            torch.softmax(self.log_weights, 0), self.options.batch_size, replacement=True, generator=generator
        )
        x0 = self.samples[rows].to(self._device)
        timesteps = torch.randint(0, self.target.train_timesteps, (len(rows),), generator=generator).to(self._device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(self._device)
        conditions = None if self.conditions is None else [self.conditions[int(row)] for row in rows]
        prediction = self.target.predict(
            self.target.add_noise(x0, noise, timesteps), timesteps, conditions, guided=False
        )
        error = prediction - self.target.regression_target(x0, noise, timesteps)
        loss = error.float().pow(2).flatten(1).mean(1).mean()
        metrics = {"loss": float(loss.detach()), "beta": self.beta, "ess": self.round_ess, "reward": self.round_reward}
        return loss, metrics

    @property
    def _device(self) -> torch.device:
        return next(iter(self.target.parameters())).device

    def _new_round(self, generator: torch.Generator) -> None:
        """Sample the current model and reweight its samples one temperature further (towards β = 1/α)."""
        trajectory = rollout(self.target, self.options.round_samples, generator, with_kl=False)
        rewards = self.target.reward(trajectory.samples, trajectory.conditions).detach().double().cpu()
        all_rewards = self.collective.gather(rewards)
        step = next_temperature(all_rewards, self.final_beta - self.beta, self.options.ess)
        if step <= 0:
            raise ValueError(
                "weighted-dsm: exp(r/α) puts all weight on one sample even for the smallest step of "
                "the tilt; raise round-samples or alpha"
            )
        self.beta = self.final_beta if step == self.final_beta - self.beta else self.beta + step
        self.samples = trajectory.samples.detach().cpu()
        self.log_weights = step * rewards
        self.conditions = trajectory.conditions
        self.updates_in_round = 0
        self.round_ess = effective_sample_fraction(step * all_rewards)
        self.round_reward = float(all_rewards.mean())
