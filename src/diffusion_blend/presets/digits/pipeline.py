"""The embedded model: a class-conditional diffusion model of 16×16 handwritten digits, as a diffusers pipeline.

Its denoiser is a diffusers ``UNet2DConditionModel`` whose condition is a class label (the digit, or ``NULL_CLASS`` for
classifier-free guidance) rather than text, so everything that works on a Stable Diffusion UNet — peft LoRA adapters,
``Blend``, the fine-tuner — works on it. The "prompt" is the digit to draw: ``"3"``, ``3`` or a list of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from .data import DIGITS, SIZE

#: the class label of "no digit": the unconditional half of classifier-free guidance
NULL_CLASS = DIGITS


def unet_config() -> dict:
    """The denoiser: three resolutions (16, 8, 4), self-attention at 4×4 and in the middle, 0.85 M parameters."""
    return dict(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=DIGITS + 1,
        cross_attention_dim=8,
    )


def scheduler_config() -> dict:
    """The noise schedule it is trained on and samples with: cosine, so ᾱ_T ≈ 2·10⁻⁹ and x_T carries nothing of the
    sample (the fine-tuner's memoryless condition); v-prediction, since an ε-prediction read as x̂₀ = (x − √(1−ᾱ)ε)/√ᾱ
    amplifies its error 2·10⁴-fold at that first step (with "trailing" DDIM steps an ε model's digits came out
    speckled, 86% legible, against 100% starting at t = 958); DDIM over "trailing" timesteps."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def digit_labels(prompt: str | int | Sequence[str | int]) -> list[int]:
    """``"3"``, ``3``, ``["3", 7]`` → ``[3]``, ``[3]``, ``[3, 7]``; raise on anything that is not a digit 0–9."""
    items = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
    labels = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not (text.isdigit() and len(text) == 1):
            raise ValueError(f"the digits model draws the digits 0-9; {item!r} is not one")
        labels.append(int(text))
    if not labels:
        raise ValueError("give at least one digit to draw")
    return labels


class DigitsPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Draw digits: ``pipe("3", num_images_per_prompt=4, generator=g).images``.

    Args of ``__call__``: ``prompt`` (a digit or a list), ``num_images_per_prompt``, ``num_inference_steps``,
    ``guidance_scale`` (classifier-free guidance against ``NULL_CLASS``; 1 turns it off), ``eta`` (DDIM's),
    ``generator``, ``latents``, ``output_type`` ("pil", "np", "pt" or "latent"), ``return_dict``,
    ``callback_on_step_end``. Images are grey (three equal channels), ink bright on dark paper.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    _lora_loadable_modules = ["unet"]

    def __init__(self, unet: UNet2DConditionModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def fresh(cls) -> DigitsPipeline:
        """An untrained pipeline of the embedded model's architecture and schedule."""
        return cls(UNet2DConditionModel(**unet_config()), DDIMScheduler(**scheduler_config()))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | int | Sequence[str | int] = "0",
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        labels = [label for label in digit_labels(prompt) for _ in range(num_images_per_prompt)]
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs must come from {self._callback_tensor_inputs}, got {unknown}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        device, dtype = self._execution_device, self.unet.dtype
        self._guidance_scale = guidance_scale
        guided = guidance_scale > 1
        class_labels = torch.tensor(labels, device=device)
        if guided:
            class_labels = torch.cat([torch.full_like(class_labels, NULL_CLASS), class_labels])
        shape = (len(labels), self.unet.config.in_channels, SIZE, SIZE)
        latents = (
            randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if latents is None
            else latents.to(device, dtype)
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        step_options = {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}
        self._num_timesteps = len(self.scheduler.timesteps)
        for index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, timestep)
            noise = self.unet(model_input, timestep, encoder_hidden_states=None, class_labels=class_labels).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, timestep, latents, **step_options).prev_sample
            if callback_on_step_end is not None:
                values = {name: latents for name in callback_on_step_end_tensor_inputs if name == "latents"}
                latents = (callback_on_step_end(self, index, timestep, values) or {}).get("latents", latents)
        images = latents if output_type == "latent" else to_images(latents)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @property
    def text_encoder(self) -> None:
        """No text encoder (diffusers' LoRA loader asks for one)."""
        return None

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps


def to_images(samples: torch.Tensor) -> torch.Tensor:
    """Model samples in [−1, 1], one channel → images [B, 3, 16, 16] in [0, 1] (grey: three equal channels)."""
    return ((samples + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)


def ink(images: torch.Tensor) -> torch.Tensor:
    """The ink of images [B, 3, H, W] in [0, 1] (their channels' mean), [B, 1, H, W]."""
    return images.mean(dim=1, keepdim=True)


__all__ = ["NULL_CLASS", "DigitsPipeline", "digit_labels", "ink", "scheduler_config", "to_images"]
