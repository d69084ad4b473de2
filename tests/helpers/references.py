"""Hand-written reference samplers: the blend computed in its expanded form, (1 − λΣw)·base + Σ λ w_i·member_i,
inside a plain denoising loop that uses the scheduler directly (no pipeline, no BlendedDenoiser), and as a stand-in
denoiser over separate plain models (ExpandedBlend)."""

from __future__ import annotations

import inspect
import math

import torch


def expanded_blend(predictions: dict, weights: dict, kl_scale: float) -> torch.Tensor:
    """The blend in float64, in its expanded form, cast back to the predictions' dtype."""
    out = (1 - kl_scale * math.fsum(weights.values())) * predictions["base"].double()
    for name, weight in weights.items():
        out = out + kl_scale * weight * predictions[name].double()
    return out.to(predictions["base"].dtype)


class ExpandedBlend(torch.nn.Module):
    """An independent stand-in denoiser: expanded_blend of separate plain models' predictions ("base" and members)."""

    def __init__(self, models, weights, kl_scale):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.weights, self.kl_scale = weights, kl_scale
        self.config = models["base"].config

    dtype, device = torch.float32, torch.device("cpu")

    def forward(self, *args, **kwargs):
        kwargs["return_dict"] = False
        predictions = {name: model(*args, **kwargs)[0] for name, model in self.models.items()}
        return (expanded_blend(predictions, self.weights, self.kl_scale),)


def _guided(prediction, guidance, do_cfg):
    if not do_cfg:
        return prediction
    uncond, cond = prediction.chunk(2)
    return uncond + guidance * (cond - uncond)


def _step_kwargs(scheduler, eta, generator):
    parameters = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in parameters else {}
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def stable_diffusion(pipe, models, weights, kl_scale, *, prompt, steps, guidance, seed, eta=0.0, size=16):
    """Stable Diffusion 1.x/2.x: ε-prediction UNet, CFG on a [uncond; cond] batch, any scheduler."""
    generator = torch.Generator().manual_seed(seed)
    do_cfg = guidance > 1
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, do_cfg)
    context = torch.cat([uncond, cond]) if do_cfg else cond
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latent_size = size // pipe.vae_scale_factor
    latents = torch.randn((1, 4, latent_size, latent_size), generator=generator) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        predictions = {name: model(x, t, encoder_hidden_states=context).sample for name, model in models.items()}
        noise = _guided(expanded_blend(predictions, weights, kl_scale), guidance, do_cfg)
        latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


@torch.no_grad()
def stable_diffusion_3(pipe, models, weights, kl_scale, *, prompt, steps, guidance, seed, size=16):
    """SD3: a flow-matching transformer predicting velocities, Euler steps in σ."""
    generator = torch.Generator().manual_seed(seed)
    do_cfg = guidance > 1
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=do_cfg, device="cpu"
    )
    context = torch.cat([negative, embeds]) if do_cfg else embeds
    pooled = torch.cat([negative_pooled, pooled]) if do_cfg else pooled
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latent_size = size // pipe.vae_scale_factor
    latents = torch.randn((1, 4, latent_size, latent_size), generator=generator)
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if do_cfg else latents
        timestep = t.expand(len(x))
        predictions = {
            name: model(
                hidden_states=x, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled
            ).sample
            for name, model in models.items()
        }
        velocity = _guided(expanded_blend(predictions, weights, kl_scale), guidance, do_cfg)
        latents = scheduler.step(velocity, t, latents).prev_sample
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents).sample
    return pipe.image_processor.postprocess(image, output_type="np")
