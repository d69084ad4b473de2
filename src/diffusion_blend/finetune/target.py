"""What a fine-tuning method needs of a model: the :class:`Target` protocol, and rollouts of its sampling path.

A target holds a trainable denoiser and its frozen base, the path they sample along, where samples start, what
they are conditioned on and what they are worth. The methods (``adjoint-matching``, ``policy-gradient``,
``weighted-dsm``) see only this protocol, so one implementation of each serves the lab's networks, LoRA adapters on
diffusers denoisers and small full modules alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .path import StochasticPath, kl


class Target(Protocol):
    path: StochasticPath
    #: whether :meth:`reward` is differentiable (adjoint matching needs it)
    differentiable: bool

    def parameters(self) -> Sequence[torch.nn.Parameter]:
        """The trainable parameters (a LoRA's, a correction network's, a whole module's)."""

    def conditions(self, count: int, generator: torch.Generator) -> Any:
        """What ``count`` samples are conditioned on (prompts drawn from the prompt set, or None)."""

    def initial_noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """x_T for ``count`` samples."""

    def predict(
        self, x: torch.Tensor, timestep: torch.Tensor, conditions: Any, *, base: bool = False, guided: bool = True
    ) -> torch.Tensor:
        """The fine-tuned (or, with ``base``, the base) denoiser's prediction; ``guided`` applies the target's
        classifier-free guidance (rollouts), otherwise the conditional prediction alone (regression targets).
        ``timestep`` is a scalar or one per row."""

    def base_context(self) -> AbstractContextManager:
        """A context in which the base's predictions (``base=True``) can be differentiated: a backward pass through
        one must run inside it (gradient checkpointing recomputes the base's forward there)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, one timestep per row."""

    def regression_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoising-score-matching target of the prediction type (ε, v or x₀)."""

    def reward(self, x0: torch.Tensor, conditions: Any) -> torch.Tensor:
        """r(x₀), one value per sample (decoded first for latent models)."""


@dataclass
class Trajectory:
    """Rollouts of a target along its path: ``states[k]`` is x before step k (``states[-1]`` the samples), ``noises[k]``
    the standard normal noise of step k, ``controls[k]`` its control u (zero at deterministic steps and where the
    base was not evaluated), ``kls[k]`` = ‖u‖²/2 per sample."""

    states: list[torch.Tensor]
    noises: list[torch.Tensor]
    controls: list[torch.Tensor]
    kls: torch.Tensor  # (steps, batch)
    conditions: Any

    @property
    def samples(self) -> torch.Tensor:
        return self.states[-1]


def standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise drawn on the CPU from ``generator`` and moved to ``like``'s device: the same draws on every device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


@torch.no_grad()
def rollout(
    target: Target, count: int, generator: torch.Generator, *, with_kl: bool = True, base: bool = False
) -> Trajectory:
    """Sample ``count`` trajectories from the fine-tuned model (or the base); with ``with_kl`` also evaluate the
    base at every stochastic step for the exact per-step KL. The deterministic steps of a stochastic path take the
    base's prediction (they carry no KL); a deterministic sampler (η = 0) uses the model at every step."""
    conditions = target.conditions(count, generator)
    x = target.initial_noise(count, generator)
    states, noises, controls = [x], [], []
    kls = torch.zeros(len(target.path.steps), count, dtype=torch.float64)
    for index, step in enumerate(target.path.steps):
        timestep = torch.tensor(step.timestep, device=x.device)
        use_base = base or (step.deterministic and target.path.stochastic)
        out = target.predict(x, timestep, conditions, base=use_base)
        control = torch.zeros_like(x)
        if with_kl and not use_base and not step.deterministic:
            control = step.control(out, target.predict(x, timestep, conditions, base=True))
            kls[index] = kl(control).double().cpu()
        noise = standard_normal(x, generator)
        x = step.sample(step.mean(x, out), noise)
        states.append(x)
        noises.append(noise)
        controls.append(control)
    return Trajectory(states, noises, controls, kls, conditions)
