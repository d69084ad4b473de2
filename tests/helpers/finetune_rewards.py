"""Rewards for the fine-tuning tests, as user rewards (``module:function``): ``helpers.finetune_rewards:NAME``."""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 × the mean pixel value: differentiable (scaled, as the tiny random VAE's images vary little)."""
    return 100 * images.mean(dim=(1, 2, 3))


brightness.differentiable = True


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 × (red minus the other channels), as a black box (no gradient): what the policy-gradient method is for."""
    with torch.no_grad():
        return 100 * (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2))
