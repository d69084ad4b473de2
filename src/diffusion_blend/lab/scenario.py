"""Lab scenarios: a Gaussian-mixture base, named quadratic rewards, the KL weight α and the noise schedule.

A scenario file (YAML or JSON) looks like::

    alpha: 1.0
    base:
      weights: [0.25, 0.25, 0.25, 0.25]
      means: [[2, 2], [2, -2], [-2, 2], [-2, -2]]
      covariance: 0.3            # σ²·I for every component, or `covariances:` one d×d matrix per component
    rewards:
      r1: {b: [1, 0]}            # r(x) = bᵀx − ½ xᵀAx; A defaults to 0 (a linear reward)
      r2: {b: [0, 1], A: [[0.5, 0], [0, 0]]}
    schedule: {beta_start: 0.0001, beta_end: 0.02, train_steps: 1000}
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .mixture import DTYPE, GaussianMixture, QuadraticReward


@dataclass(frozen=True)
class Schedule:
    """diffusers' DDPM ``linear`` β schedule."""

    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int = 1000

    def __post_init__(self):
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"schedule: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not isinstance(self.train_steps, int) or self.train_steps < 2:
            raise ValueError(f"schedule: train_steps must be an integer >= 2, got {self.train_steps!r}")


@dataclass(frozen=True)
class Scenario:
    base: GaussianMixture
    rewards: dict[str, QuadraticReward]
    alpha: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    name: str = "custom"

    def __post_init__(self):
        if not self.rewards:
            raise ValueError("scenario: at least one reward is needed")
        for reward_name, reward in self.rewards.items():
            if reward.dim != self.base.dim:
                raise ValueError(
                    f"scenario: reward {reward_name!r} is {reward.dim}-dimensional, the base {self.base.dim}"
                )
            if not reward.concave:
                raise ValueError(
                    f"scenario: reward {reward_name!r} needs A positive semi-definite "
                    "(else exp(r/α) is not normalisable)"
                )
        if not self.alpha > 0:
            raise ValueError(f"scenario: alpha must be > 0, got {self.alpha}")

    def with_alpha(self, alpha: float) -> Scenario:
        return Scenario(self.base, self.rewards, alpha, self.schedule, self.name)


def grid_scenario(dim: int = 2, spread: float = 2.0, variance: float = 0.3, alpha: float = 1.0) -> Scenario:
    """Equal-weight components at every corner (±spread, …, ±spread), covariance variance·I; rewards r_i(x) = x_i."""
    corners = torch.tensor(list(itertools.product((spread, -spread), repeat=dim)), dtype=DTYPE)
    count = len(corners)
    base = GaussianMixture(
        torch.full((count,), 1 / count, dtype=DTYPE),
        corners,
        variance * torch.eye(dim, dtype=DTYPE).expand(count, dim, dim),
    )
    rewards = {f"r{i + 1}": QuadraticReward.linear(torch.eye(dim, dtype=DTYPE)[i]) for i in range(dim)}
    return Scenario(base, rewards, alpha, name=f"grid-{dim}d")


def default_scenario() -> Scenario:
    """d = 2, four components at (±2, ±2) with covariance 0.3·I, rewards r1 = x₁ and r2 = x₂, α = 1."""
    return grid_scenario(dim=2)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario from a YAML or JSON file (see the module docstring); raise ValueError naming the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"scenario: cannot read {path} ({error.strerror or error})") from error
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:
        raise ValueError(
            f"scenario: {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({error})"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"scenario: {path} must hold a mapping with base, rewards and alpha")
    return scenario_from_dict(data, name=path.stem)


def scenario_from_dict(data: dict, name: str = "custom") -> Scenario:
    unknown = set(data) - {"alpha", "base", "rewards", "schedule", "name"}
    if unknown:
        raise ValueError(f"scenario: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        base = _base_from_dict(data["base"])
        rewards = {
            str(key): QuadraticReward(
                torch.tensor(spec["b"], dtype=DTYPE),
                torch.tensor(spec.get("A", [[0.0] * len(spec["b"])] * len(spec["b"])), dtype=DTYPE),
            )
            for key, spec in data["rewards"].items()
        }
        schedule = Schedule(**data.get("schedule", {}))
        return Scenario(base, rewards, float(data.get("alpha", 1.0)), schedule, str(data.get("name", name)))
    except KeyError as error:
        raise ValueError(f"scenario: missing {error.args[0]!r}") from None
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith("scenario") else f"scenario: {error}") from None
    except (TypeError, RuntimeError, AttributeError, IndexError) as error:
        raise ValueError(f"scenario: malformed ({error})") from None


def _base_from_dict(spec: dict) -> GaussianMixture:
    means = torch.tensor(spec["means"], dtype=DTYPE)
    if means.ndim != 2:
        raise ValueError(f"scenario: base means must be a list of points (K × d), got shape {tuple(means.shape)}")
    count, dim = means.shape
    weights = torch.tensor(spec.get("weights", [1 / count] * count), dtype=DTYPE)
    if "covariances" in spec:
        covs = torch.tensor(spec["covariances"], dtype=DTYPE)
    else:
        covs = float(spec.get("covariance", 1.0)) * torch.eye(dim, dtype=DTYPE).expand(count, dim, dim)
    return GaussianMixture(weights, means, covs)
