"""``policy-gradient``: the likelihood-ratio gradient of the objective, for any reward (black boxes included).

The sampler is a policy whose action at x_t is x_{t−1} ~ N(μ_base + σ_t u_θ, σ_t²). As in DPOK (Fan et al. 2023), the
reward's gradient is E[Σ_t ∇log π_θ(x_{t−1}|x_t) · A_t] with a baseline, in clipped-ratio (PPO) updates over each
batch of rollouts; unlike DPOK, the KL is the exact per-step KL ‖u_t‖²/2 of the objective, entering twice as an
exact policy gradient of "r − α Σ KL" requires: pathwise (α ∇_θ KL_t at the visited x_t) and through the return of
every earlier step (G_t = r(x₀) − α Σ_{later steps s} KL_s). Returns are centred per step and scaled by the batch's
reward spread, one scale for both terms, so α keeps its meaning.
"""

from __future__ import annotations

import dataclasses

import torch

from .method import OnPolicyMethod, OnPolicyOptions
from .path import kl
from .target import rollout


@dataclasses.dataclass
class PolicyGradientOptions(OnPolicyOptions):
    batch_size: int = 64
    #: optimizer updates on each batch of rollouts (PPO's epochs)
    updates_per_rollout: int = 4
    #: PPO's ratio clipping: ratios outside [1 − clip, 1 + clip] give no gradient
    clip: float = 1e-2


class PolicyGradient(OnPolicyMethod):
    name = "policy-gradient"
    options_class = PolicyGradientOptions
    state_fields = ("states", "noises", "old_controls", "advantages", "scale", "conditions", "uses", "rollout_metrics")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noises = self.old_controls = self.advantages = None
        self.scale = 1.0

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        terms, clipped = [], []
        for index in self.steps_of_update(generator):
            step, x = self.target.path.steps[index], self.states[index]
            timestep = torch.tensor(step.timestep, device=x.device)
            with torch.no_grad():
                base_out = self.target.predict(x, timestep, self.conditions, base=True)
            control = step.control(self.target.predict(x, timestep, self.conditions), base_out)
            # x_{t−1} = μ_base + σ (u_old + z): the log-likelihood ratio of the new policy to the old one
            action = self.old_controls[index] + self.noises[index]
            log_ratio = -0.5 * (action - control).flatten(1).pow(2).sum(1) + 0.5 * self.noises[index].flatten(1).pow(
                2
            ).sum(1)
            ratio = log_ratio.float().exp()
            advantage = self.advantages[index].to(ratio.device)
            low, high = 1 - self.options.clip, 1 + self.options.clip
            surrogate = torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
            terms.append((-surrogate + self.alpha * kl(control).float()).mean() / self.scale)
            clipped.append(float(((ratio < low) | (ratio > high)).float().mean()))
        loss = torch.stack(terms).mean()
        return loss, {"loss": float(loss.detach()), "clipped": sum(clipped) / len(clipped), **self.rollout_metrics}

    def collect(self, generator: torch.Generator) -> None:
        """Roll out the current policy; keep its controls (the old policy of the ratios) and the advantages."""
        trajectory = rollout(self.target, self.options.batch_size, generator)
        rewards = self.target.reward(trajectory.samples, trajectory.conditions).detach().double().cpu()
        kls = trajectory.kls  # (steps, batch)
        later_kls = kls.flip(0).cumsum(0).flip(0) - kls  # Σ over the steps after each one
        returns = rewards[None] - self.alpha * later_kls
        all_returns = self.collective.gather(returns.T).T
        advantages = returns - all_returns.mean(1, keepdim=True)
        all_rewards = self.collective.gather(rewards)
        self.scale = float(all_rewards.std()) if len(all_rewards) > 1 and float(all_rewards.std()) > 0 else 1.0
        self.states = [state.detach() for state in trajectory.states]
        self.noises = trajectory.noises
        self.old_controls = trajectory.controls
        self.advantages = advantages.float()
        self.conditions = trajectory.conditions
        self.rollout_metrics = {
            "reward": float(all_rewards.mean()),
            "kl": float(self.collective.gather(kls.sum(0)).mean()),
        }
