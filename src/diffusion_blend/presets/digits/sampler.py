"""The digits model's base sampler as a loop, for the steering baselines (CoDe, reward-gradient guidance)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import DDIMScheduler

from ...baselines.sampler import BaseSampler
from ...finetune.path import StochasticPath
from .data import SIZE
from .pipeline import NULL_CLASS, DigitsPipeline, digit_labels, to_images


def base_sampler(
    pipe: DigitsPipeline,
    prompts: Sequence[str],
    rewards: Mapping[str, object],
    *,
    steps: int,
    guidance_scale: float = 1.0,
    eta: float = 1.0,
) -> BaseSampler:
    """The sampler ``pipe(prompts, num_inference_steps=steps, guidance_scale=..., eta=...)`` runs, one image per
    prompt, scored by ``rewards`` (name → reward model, in that order)."""
    labels = torch.tensor([label for prompt in prompts for label in digit_labels(prompt)], device=pipe.device)
    if len(labels) != len(prompts):
        raise ValueError("one digit per prompt")
    path = StochasticPath.from_scheduler(DDIMScheduler.from_config(pipe.scheduler.config), steps, eta)
    models = list(rewards.values())

    def predict(x: torch.Tensor, timestep: int, rows: torch.Tensor) -> torch.Tensor:
        classes = labels[rows]
        if guidance_scale == 1:
            return pipe.unet(x, timestep, encoder_hidden_states=None, class_labels=classes).sample
        both = torch.cat([torch.full_like(classes, NULL_CLASS), classes])
        unconditional, conditional = pipe.unet(
            torch.cat([x, x]), timestep, encoder_hidden_states=None, class_labels=both
        ).sample.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def score(x0: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        images, asked = to_images(x0.float()), [prompts[int(row)] for row in rows]
        return torch.stack([model(images, asked) for model in models], dim=1)

    return BaseSampler(
        path,
        predict,
        score,
        [bool(model.differentiable) for model in models],
        (pipe.unet.config.in_channels, SIZE, SIZE),
        pipe.device,
        pipe.unet.dtype,
    )
