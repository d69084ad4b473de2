"""Fine-tuning targets on real denoisers: a peft LoRA adapter on a diffusers pipeline's UNet.

The base is the same module with the adapter switched off, so the base's prediction costs no second copy of the
weights. Samples are drawn along the path of a DDIM (η > 0) or DDPM scheduler made from the pipeline's own
scheduler config; prompts are drawn from a list; rewards see decoded images in [0, 1].

Classifier-free guidance (``guidance_scale`` > 1) applies to the sampled trajectories only: rollouts, and the KL
along them, use the guided predictions of the fine-tuned model and of the base, while the methods' regressions fit
the conditional prediction. That is the default of the field (DPOK samples with guidance too); with
``guidance_scale=1`` the fine-tuned sampler is exactly the one the objective is stated for.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict

from ..images import decoded
from .path import StochasticPath

#: The attention projections a LoRA adapts unless told otherwise (the method's published basis models do the same).
LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "finetune"
SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


class LoraTarget:
    """A LoRA on a pipeline's UNet; subclasses say how samples are conditioned (:meth:`condition`) and decoded.

    Args:
        pipe: the base pipeline (its UNet gets the adapter; nothing else is trained).
        reward: a :class:`~diffusion_blend.rewards.Reward` on images in [0, 1] and their prompts.
        prompts: the prompts rollouts are conditioned on, drawn uniformly.
        shape: one sample's shape in the UNet's space (channels, height, width).
        rank, lora_alpha, modules: the adapter (``lora_alpha`` defaults to ``rank``: an update scale of 1).
        steps, eta, sampler: the sampling path (``sampler`` "ddim" or "ddpm"; DDPM is η = 1).
        guidance_scale, negative_prompt: classifier-free guidance of the rollouts.
        seed: initialises the adapter (peft's: A random, B zero, so training starts at the base).
    """

    def __init__(
        self,
        pipe,
        reward,
        prompts: Sequence[str],
        shape: tuple[int, ...],
        *,
        rank: int = 4,
        lora_alpha: float | None = None,
        modules: Sequence[str] = LORA_MODULES,
        steps: int = 50,
        eta: float = 1.0,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 1):
            raise ValueError(f"guidance scale must be a finite number >= 1, got {guidance_scale}")
        if not prompts:
            raise ValueError("no prompts to fine-tune on")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.pipe, self.reward_model, self.prompts = pipe, reward, list(prompts)
        self.differentiable = bool(reward.differentiable)
        self.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
        self.path = StochasticPath.from_scheduler(self.scheduler, steps, eta)
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.unet = pipe.unet
        self.device = self.unet.device
        self.shape = tuple(shape)
        self.lora = {"rank": rank, "lora_alpha": lora_alpha or rank, "modules": list(modules)}
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self._add_adapter(rank, lora_alpha or rank, list(modules), seed)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def _add_adapter(self, rank: int, lora_alpha: float, modules: list[str], seed: int) -> None:
        if ADAPTER in (getattr(self.unet, "peft_config", None) or {}):
            raise ValueError(f"the UNet already has an adapter named {ADAPTER!r}")
        torch.manual_seed(seed)
        try:
            self.unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=modules, init_lora_weights=True),
                adapter_name=ADAPTER,
            )
        except ValueError as error:
            raise ValueError(f"LoRA modules {modules}: {error}") from error
        self.unet.set_adapter(ADAPTER)
        self._adapter_on = True

    def parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for name, parameter in self.unet.named_parameters() if f".{ADAPTER}." in name]

    # ------------------------------------------------------------------------------------------ conditioning
    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning arguments for ``prompts`` (one row each)."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples → images in [0, 1] (differentiable)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- sampling
    def conditions(self, count: int, generator: torch.Generator) -> list[str]:
        return [self.prompts[int(i)] for i in torch.randint(len(self.prompts), (count,), generator=generator)]

    def initial_noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((count, *self.shape), generator=generator)
        return (noise * self.scheduler.init_noise_sigma).to(self.device, self.unet.dtype)

    def predict(
        self, x: torch.Tensor, timestep, conditions: list[str], *, base: bool = False, guided: bool = True
    ) -> torch.Tensor:
        with self.base_context() if base else contextlib.nullcontext():
            if not guided or self.guidance_scale == 1:
                return self.unet(x, timestep, **self.condition(conditions)).sample
            negative = self.condition([self.negative_prompt] * len(conditions))
            positive = self.condition(conditions)
            both = {
                key: None if value is None else torch.cat([negative[key], value]) for key, value in positive.items()
            }
            unconditional, conditional = self.unet(torch.cat([x, x]), timestep, **both).sample.chunk(2)
            return unconditional + self.guidance_scale * (conditional - unconditional)

    @contextlib.contextmanager
    def base_context(self):
        """The adapter switched off (re-entrant: inside, the base stays the base)."""
        if not self._adapter_on:
            yield
            return
        self.unet.disable_adapters()
        self._adapter_on = False
        try:
            yield
        finally:
            self.unet.enable_adapters()
            self._adapter_on = True

    # ------------------------------------------------------------------------------------------- regression
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def regression_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    @property
    def train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def reward(self, x0: torch.Tensor, conditions: list[str]) -> torch.Tensor:
        return self.reward_model(self.decode(x0), conditions)

    # ------------------------------------------------------------------------------------------------ saving
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            key: value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(self.unet, adapter_name=ADAPTER).items()
        }

    def outputs(self, folder: Path) -> dict:
        """The adapter as ``pytorch_lora_weights.safetensors`` (diffusers' format, its LoraConfig in the header):
        ``Blend`` and ``pipe.load_lora_weights`` read it."""
        return {folder / "pytorch_lora_weights.safetensors": self._write_lora}

    def _write_lora(self, path: Path) -> None:
        with tempfile.TemporaryDirectory(dir=path.parent) as staging:
            StableDiffusionPipeline.save_lora_weights(
                staging,
                unet_lora_layers=self.lora_state_dict(),
                unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
            )
            os.replace(Path(staging) / "pytorch_lora_weights.safetensors", path)

    def describe(self) -> dict:
        return {
            "lora": self.lora,
            "guidance_scale": self.guidance_scale,
            "prompts": len(self.prompts),
            "sampler": type(self.scheduler).__name__,
            "size": list(self.shape),
        }


class StableDiffusionLoraTarget(LoraTarget):
    """A LoRA on the UNet of a Stable Diffusion 1.x/2.x pipeline (``StableDiffusionPipeline`` and its subclasses):
    prompts are text, encoded once each; samples are latents the VAE decodes."""

    def __init__(
        self, pipe, reward, prompts: Sequence[str], *, height: int | None = None, width: int | None = None, **options
    ):
        check_pipeline(pipe)
        scale, unet = pipe.vae_scale_factor, pipe.unet
        height = height or unet.config.sample_size * scale
        width = width or unet.config.sample_size * scale
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of {scale}, got {height}×{width}")
        super().__init__(pipe, reward, prompts, (unet.config.in_channels, height // scale, width // scale), **options)
        self._embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text encoder's embeddings, computed once per distinct prompt."""
        new = sorted(set(prompts) - set(self._embeddings))
        if new:
            encoded, _ = self.pipe.encode_prompt(new, self.device, 1, False)
            self._embeddings.update(zip(new, encoded))
        return {"encoder_hidden_states": torch.stack([self._embeddings[prompt] for prompt in prompts])}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decoded(self.pipe, latents)


def check_pipeline(pipe) -> None:
    """The fine-tuner trains LoRAs on Stable Diffusion 1.x/2.x pipelines (a UNet conditioned on text embeddings)."""
    check_pipeline_class(type(pipe), type(pipe).__name__)


def check_pipeline_class(cls: type | None, name: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, StableDiffusionPipeline)):
        raise ValueError(
            f"fine-tuning supports Stable Diffusion 1.x/2.x pipelines (a UNet taking text embeddings); got {name}"
        )
