"""The base model's stochastic sampler, step by step: what the inference-time steering baselines modify.

CoDe and reward-gradient guidance change how a DDIM (η > 0) or DDPM sampler of the *base* model moves — which
candidate continues, where the mean goes — so they need the sampler as a loop they control, not a pipeline call.
:class:`BaseSampler` is that loop on a :class:`~diffusion_blend.finetune.path.StochasticPath`, with the noise of
each image drawn from that image's own generator in the order diffusers' pipelines draw it (x_T, then one draw per
step): unsteered, it samples what the pipeline samples from the same generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..finetune.path import StochasticPath

#: (x, timestep, rows) → the base's prediction; ``rows[j]`` is the image (its prompt, its weights) row j belongs to
Predict = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
#: (x̂₀, rows) → the rewards of each row's sample, [len(rows), number of rewards]
Rewards = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BaseSampler:
    """The base model's sampler along ``path``, with the rewards the steering methods score samples by.

    Args:
        path: the sampler's Gaussian steps (DDIM with η > 0, or DDPM).
        predict: the base's prediction (classifier-free guided as the pipeline would) for rows of a batch.
        rewards: each reward of a clean sample (decoded inside for latent models).
        differentiable: per reward, whether its gradient exists (otherwise steering that needs one estimates it).
        shape: one sample's shape; ``init_noise_sigma`` scales x_T as the scheduler does.
    """

    path: StochasticPath
    predict: Predict
    rewards: Rewards
    differentiable: Sequence[bool]
    shape: tuple[int, ...]
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    init_noise_sigma: float = 1.0

    def initial(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """x_T of each image, from its generator."""
        return self.noise(generators, 1) * self.init_noise_sigma

    def noise(self, generators: Sequence[torch.Generator], copies: int) -> torch.Tensor:
        """``copies`` standard normal draws per image, image by image ([images · copies, *shape], copies adjacent)."""
        draws = [torch.randn((copies, *self.shape), generator=generator, dtype=self.dtype) for generator in generators]
        return torch.cat(draws).to(self.device)

    def step(self, index: int, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        step = self.path.steps[index]
        return step.sample(step.mean(x, out), noise)

    def clean(self, index: int, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's prediction at step ``index`` and x̂₀ read from it (Tweedie's estimate of the sample)."""
        step = self.path.steps[index]
        out = self.predict(x, step.timestep, rows)
        return out, step.clean(x, out)

    def weighted(self, x0: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i r_i(x̂₀) per row, ``weights`` [images, rewards]."""
        return (self.rewards(x0, rows).to(weights) * weights[rows]).sum(1)

    @torch.no_grad()
    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The plain base sampler: the reference every steering method reduces to when it does not steer."""
        x = self.initial(generators)
        rows = torch.arange(len(generators), device=x.device)
        for index, step in enumerate(self.path.steps):
            x = self.step(index, x, self.predict(x, step.timestep, rows), self.noise(generators, 1))
        return x


def check_weights(weights: torch.Tensor, images: int, rewards: int) -> torch.Tensor:
    """Per-image reward weights as a float64 [images, rewards] tensor; raise where the shape or a value is wrong."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (images, rewards):
        raise ValueError(f"weights must be [images, rewards] = [{images}, {rewards}], got {list(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError("weights must be finite")
    return weights
