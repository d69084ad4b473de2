"""Calling the tiny pipelines and denoisers, with and without LoRAs, and comparing what they return."""

from __future__ import annotations

import torch

from helpers import tiny

PROMPT = "a red cat"
SIZE = 16


#: in ``call_kwargs``' extra: leave that argument out (a pipeline that takes no height, such as img2img's)
LEAVE_OUT = object()


def call_kwargs(steps=4, guidance=5.0, seed=0, **extra):
    """A short pipeline call's arguments; ``extra`` adds, replaces or (``LEAVE_OUT``) removes any of them."""
    kwargs = (
        dict(
            prompt=PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        )
        | extra
    )
    return {name: value for name, value in kwargs.items() if value is not LEAVE_OUT}


def with_lora(pipe, lora_file, name="basis"):
    """The plain diffusers way: load the LoRA into the pipeline and keep it active."""
    pipe.load_lora_weights(str(lora_file), adapter_name=name)
    return pipe


def lora_denoiser(builder, lora_file, prefix="unet"):
    """A separate denoiser with the LoRA loaded and active (plain peft), for the reference loops.

    ``use_safetensors=True``: without it diffusers' model-level loader reads the file without its header and
    silently drops the adapter's lora_alpha (diffusers 0.42)."""
    model = builder(0)
    model.load_lora_adapter(str(lora_file), prefix=prefix, adapter_name="basis", use_safetensors=True)
    return model


def lora_base(names=("ir", "aes"), **config):
    """tiny.unet(0) with a random LoRA adapter per name (``config``: tiny.lora_config's options), loaded, inactive."""
    base = tiny.unet(0)
    for seed, name in enumerate(names, start=10):
        tiny.add_lora(base, name, seed, tiny.lora_config(**config))
    base.set_adapter([])  # loaded, inactive: as Blend leaves them
    return base


def cfg_inputs(samples=2, seed=0):
    """A CFG batch for tiny.unet(): [uncond; cond] halves share their latents."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(samples, 4, 8, 8, generator=generator)
    context = torch.randn(2 * samples, 5, tiny.TEXT_HIDDEN, generator=generator)
    return torch.cat([latents, latents]), torch.tensor(400), context


def denoise(denoiser, weights, kl_scale=1.0, mode="mix", seed=0, **call):
    """One blended prediction of ``denoiser`` on cfg_inputs(); ``call`` adds arguments to the denoiser's call."""
    denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(seed))
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        return denoiser(sample, t, encoder_hidden_states=context, **call).sample


def forward_calls(module):
    """A list that grows by one at each call of ``module`` (a forward pre-hook)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def max_diff(a, b):
    """The largest absolute difference between two arrays or tensors, as a float."""
    return float(abs(a - b).max())
