"""Basis models of the embedded model: the package's fine-tuner on the digits UNet.

The adapter covers the attention projections and the residual blocks' convolutions (stroke thickness is a matter of
single pixels at 16×16, which attention at 4×4 alone cannot reach). Prompts are the digits; the base is the shipped
model (or any saved :class:`DigitsPipeline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...finetune.denoiser_target import LORA_MODULES, LoraTarget
from ...finetune.run import Request
from .data import DIGITS, SIZE
from .pipeline import NULL_CLASS, DigitsPipeline, digit_labels, to_images

#: what the digits' LoRAs adapt
DIGITS_LORA_MODULES = (*LORA_MODULES, "conv1", "conv2")
ALL_DIGITS = tuple(str(digit) for digit in range(DIGITS))


class DigitsLoraTarget(LoraTarget):
    """A LoRA on a :class:`DigitsPipeline`'s UNet: samples are ink images in [−1, 1], conditioned on the digit."""

    def __init__(self, pipe: DigitsPipeline, reward, prompts: Sequence[str] = ALL_DIGITS, **options):
        for prompt in prompts:
            if len(digit_labels(prompt)) != 1:
                raise ValueError(f"prompts of the digits model are single digits, got {prompt!r}")
        options.setdefault("modules", DIGITS_LORA_MODULES)
        super().__init__(pipe, reward, prompts, (pipe.unet.config.in_channels, SIZE, SIZE), **options)

    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        labels = [digit_labels(prompt)[0] if prompt.strip() else NULL_CLASS for prompt in prompts]
        return {"encoder_hidden_states": None, "class_labels": torch.tensor(labels, device=self.device)}

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return to_images(x0.float())


def finetune_digits(
    reward: str,
    alpha: float,
    out: str | Path,
    *,
    prompts: Sequence[str] = ALL_DIGITS,
    base: str | Path | None = None,
    **options,
) -> dict:
    """Fine-tune a basis model (or, for a weighted reward, a MORL oracle) of the digits model; ``options`` are
    :class:`~diffusion_blend.finetune.run.Request`'s fields."""
    from . import load_pipeline

    request = Request(reward, alpha, Path(out).expanduser(), **options)
    request.check()
    pipe = load_pipeline(request.torch_device, base)
    target = DigitsLoraTarget(pipe, request.reward_model(), prompts, **request.target_options)
    return request.run(target, {"base": "digits" if base is None else str(Path(base).resolve()), "prompts_file": None})
