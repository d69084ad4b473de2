"""The lab's quadratic rewards r(x) = bᵀx − ½ xᵀAx as rewards of the common interface (on samples, not images):
what ``get_reward("lab:r1")`` loads, through the registry's module path."""

from __future__ import annotations

import torch

from ..rewards import Reward
from .mixture import QuadraticReward
from .scenario import default_scenario, load_scenario


class LabReward(Reward):
    """A lab scenario's reward; its "images" are the lab's samples [B, d] (prompts are ignored). Differentiable."""

    differentiable = True

    def __init__(self, reward: QuadraticReward, name: str):
        super().__init__()
        self.reward, self.name = reward, name

    @classmethod
    def load(cls, reward_name: str, path_or_id=None) -> LabReward:
        """``reward_name`` of the default scenario, or of the scenario file ``path_or_id``."""
        scenario = load_scenario(path_or_id) if path_or_id is not None else default_scenario()
        if reward_name not in scenario.rewards:
            raise ValueError(
                f"lab: scenario {scenario.name!r} has no reward {reward_name!r} (it has {', '.join(scenario.rewards)})"
            )
        return cls(scenario.rewards[reward_name], f"lab:{reward_name}")

    def check_inputs(self, samples: torch.Tensor, prompts) -> tuple[torch.Tensor, list[str]]:
        if not isinstance(samples, torch.Tensor) or samples.ndim != 2 or samples.shape[1] != self.reward.dim:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"{self.name}: samples must be a tensor [B, {self.reward.dim}], got {shape}")
        return samples, [""] * len(samples) if prompts is None else list(prompts)

    def score(self, samples: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.reward(samples)
