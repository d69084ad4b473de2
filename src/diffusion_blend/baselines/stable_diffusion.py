"""A Stable Diffusion 1.x/2.x pipeline's base sampler as a loop, for the steering baselines (CoDe, guidance)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ..finetune.path import StochasticPath
from ..images import decoded
from .sampler import BaseSampler


def stable_diffusion_sampler(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    rewards: Mapping[str, object],
    *,
    steps: int,
    guidance_scale: float = 7.5,
    eta: float = 1.0,
    height: int | None = None,
    width: int | None = None,
) -> BaseSampler:
    """The sampler ``pipe(prompts, num_inference_steps=steps, guidance_scale=..., eta=..., height=..., width=...)``
    runs with DDIM (η > 0), one image per prompt, scored by ``rewards`` (name → reward model) on the decoded image."""
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ValueError(f"CoDe and guidance steer Stable Diffusion 1.x/2.x pipelines here; got {type(pipe).__name__}")
    scale, unet = pipe.vae_scale_factor, pipe.unet
    height, width = height or unet.config.sample_size * scale, width or unet.config.sample_size * scale
    path = StochasticPath.from_scheduler(DDIMScheduler.from_config(pipe.scheduler.config), steps, eta)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(list(prompts), pipe.device, 1, guidance_scale > 1)
    models = list(rewards.values())

    def predict(x: torch.Tensor, timestep: int, rows: torch.Tensor) -> torch.Tensor:
        if guidance_scale <= 1:
            return unet(x, timestep, encoder_hidden_states=positive[rows]).sample
        both = torch.cat([negative[rows], positive[rows]])
        unconditional, conditional = unet(torch.cat([x, x]), timestep, encoder_hidden_states=both).sample.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def score(x0: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        images = decoded(pipe, x0).float()
        asked = [prompts[int(row)] for row in rows]
        return torch.stack([model(images, asked) for model in models], dim=1)

    shape = (unet.config.in_channels, height // scale, width // scale)
    return BaseSampler(
        path,
        predict,
        score,
        [bool(model.differentiable) for model in models],
        shape,
        pipe.device,
        unet.dtype,
        float(pipe.scheduler.init_noise_sigma),
    )
