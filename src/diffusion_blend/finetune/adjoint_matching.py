"""``adjoint-matching``: Adjoint Matching's lean-adjoint regression (Domingo-Enrich et al. 2024, Algorithm 1),
on the discrete path.

With the cost Σ_t ‖u_t‖²/2 − r(x₀)/α and transitions x_{t−1} = μ_base(x_t) + σ_t (u_t + z_t), the lean adjoint runs
backwards along a rollout through the base's dynamics only:

    ã₀ = −∇r(x₀)/α,    ã_t = (∂μ_base/∂x_t)ᵀ ã_{t−1}

and the optimal control at x_t is u* = −σ_t E[ã_{t−1} | x_t]. Each update regresses
u_θ(x_t) = k_t (out_θ − out_base)/σ_t onto −σ_t ã_{t−1} on rollouts of the current model (detached): the
regression's unique fixed point is u*, so the fine-tuned sampler tilts by exp(r/α) exactly where the path is
memoryless. The adjoint flows through the base's prediction (its Jacobian in x), never around it; deterministic
steps propagate it but are never regressed.
"""

from __future__ import annotations

import dataclasses

import torch

from .method import OnPolicyMethod, OnPolicyOptions
from .target import rollout


@dataclasses.dataclass
class AdjointMatchingOptions(OnPolicyOptions):
    batch_size: int = 64


class AdjointMatching(OnPolicyMethod):
    name = "adjoint-matching"
    options_class = AdjointMatchingOptions
    needs_gradient = True
    state_fields = ("states", "adjoints", "conditions", "uses", "rollout_metrics")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adjoints: list[torch.Tensor] | None = None

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        losses = []
        for index in self.steps_of_update(generator):
            step, x = self.target.path.steps[index], self.states[index]
            timestep = torch.tensor(step.timestep, device=x.device)
            with torch.no_grad():
                base_out = self.target.predict(x, timestep, self.conditions, base=True, guided=False)
            control = step.control(self.target.predict(x, timestep, self.conditions, guided=False), base_out)
            target_control = -step.sigma * self.adjoints[index]
            losses.append((control - target_control).float().pow(2).flatten(1).sum(1).mean())
        loss = torch.stack(losses).mean()
        return loss, {"loss": float(loss.detach()), **self.rollout_metrics}

    def collect(self, generator: torch.Generator) -> None:
        """Roll out the current model, then run the lean adjoint backwards through the base."""
        trajectory = rollout(self.target, self.options.batch_size, generator)
        samples = trajectory.samples.detach().requires_grad_(True)
        with torch.enable_grad():
            rewards = self.target.reward(samples, trajectory.conditions)
            adjoint = -torch.autograd.grad(rewards.sum(), samples)[0] / self.alpha
        adjoints: list[torch.Tensor] = [adjoint] * len(self.target.path.steps)
        for index in reversed(range(len(self.target.path.steps))):
            adjoints[index] = adjoint.detach()  # ã at the state this step leads to
            adjoint = self._base_vjp(index, trajectory.states[index], trajectory.conditions, adjoint)
        self.states = [state.detach() for state in trajectory.states]
        self.adjoints, self.conditions = adjoints, trajectory.conditions
        self.rollout_metrics = {
            "reward": float(self.collective.gather(rewards.detach().double().cpu()).mean()),
            "kl": float(self.collective.gather(trajectory.kls.sum(0)).mean()),
        }

    def _base_vjp(self, index: int, x: torch.Tensor, conditions, adjoint: torch.Tensor) -> torch.Tensor:
        """(∂μ_base/∂x)ᵀ ã for step ``index`` at ``x``: a_t ã + k_t (∂out_base/∂x)ᵀ ã."""
        step = self.target.path.steps[index]
        x = x.detach().requires_grad_(True)
        with self.target.base_context(), torch.enable_grad():
            out = self.target.predict(x, torch.tensor(step.timestep, device=x.device), conditions, base=True)
            jacobian_part = torch.autograd.grad(out, x, grad_outputs=adjoint.to(out.dtype))[0]
        return (step.x_coef * adjoint + step.out_coef * jacobian_part).detach()
