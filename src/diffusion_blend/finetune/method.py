"""What every estimator of the fine-tuning objective shares: its options, its saved state, the processes it runs in.

The objective (DESIGN.md, docs/finetune.md): over the target's stochastic path,

    maximise  E[r(x₀)] − α · Σ_t E[KL_t],   KL_t = ‖u_t‖² / 2,

whose optimum samples p_base·exp(r/α) where the path is memoryless. A method turns it into one loss per optimizer
update (:meth:`Method.loss`), collecting whatever samples it needs first; the trainer owns the optimizer, the
checkpoints and the processes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from .target import Target


class Collective:
    """The processes a run is split over; one process here. :class:`~diffusion_blend.finetune.trainer` swaps in
    accelerate's when launched with ``accelerate launch``."""

    rank = 0
    world_size = 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along the first dimension, in rank order."""
        return tensor

    def mean_gradients(self, parameters) -> None:
        """Average the parameters' gradients over the processes."""


@dataclasses.dataclass
class Options:
    """The options every method takes; methods add their own fields."""

    #: samples per rollout (per process)
    batch_size: int = 64

    def check(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{field.name.replace('_', '-')} must be a positive integer, got {value}")
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field.name.replace('_', '-')} must be a finite number > 0, got {value}")


class Method:
    """An estimator of the objective. Subclasses set ``name``, ``options_class`` and what they need of the target,
    and implement :meth:`loss`; their resumable state is the attributes named in ``state_fields``."""

    name: ClassVar[str]
    options_class: ClassVar[type[Options]] = Options
    #: needs a stochastic path (a deterministic sampler gives it nothing to estimate from)
    needs_noise: ClassVar[bool] = True
    #: needs ∇r (a differentiable reward)
    needs_gradient: ClassVar[bool] = False
    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, target: Target, alpha: float, options: Options | None = None, collective: Collective | None = None
    ):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        self.options = options or self.options_class()
        self.options.check()
        if self.needs_noise and not target.path.stochastic:
            raise ValueError(f"{self.name} needs a stochastic sampler (η > 0): every step of this one is deterministic")
        if self.needs_gradient and not target.differentiable:
            raise ValueError(
                f"{self.name} needs a differentiable reward; use policy-gradient or weighted-dsm for a black-box one"
            )
        self.target, self.alpha = target, float(alpha)
        self.collective = collective or Collective()

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one optimizer update (its gradient estimates the objective's) and metrics to log."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_fields:
            setattr(self, name, state[name])


@dataclasses.dataclass
class OnPolicyOptions(Options):
    #: stochastic steps in each update's loss, drawn at random from the path's (all of them when it has fewer)
    regressed_steps: int = 20
    #: optimizer updates on each batch of rollouts
    updates_per_rollout: int = 1


class OnPolicyMethod(Method):
    """A method that learns from rollouts of the current model (:meth:`collect`), each batch serving
    ``updates_per_rollout`` updates, each update a random subset of the path's stochastic steps."""

    options_class = OnPolicyOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states: list[torch.Tensor] | None = None
        self.conditions = None
        self.uses = 0
        self.rollout_metrics: dict[str, float] = {}

    def collect(self, generator: torch.Generator) -> None:
        """Roll out the current model and keep what the loss needs (``states``, ``conditions``, metrics)."""
        raise NotImplementedError

    def steps_of_update(self, generator: torch.Generator) -> list[int]:
        """Collect new rollouts when the current ones are used up; the indices of the steps this update regresses."""
        if self.states is None or self.uses >= self.options.updates_per_rollout:
            self.collect(generator)
            self.uses = 0
        self.uses += 1
        stochastic = [index for index, step in enumerate(self.target.path.steps) if not step.deterministic]
        order = torch.randperm(len(stochastic), generator=generator)[: self.options.regressed_steps]
        return sorted(stochastic[int(i)] for i in order)
