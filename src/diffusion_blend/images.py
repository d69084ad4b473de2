"""Images: latents decoded as the pipelines decode them, and pictures made of several images."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch


def image_grid(images: list, columns: int | None = None) -> Any:
    """The PIL images side by side in a grid of ``columns`` (default: near-square), row by row."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def decoded(pipe: Any, latents: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Latents → images [B, 3, H, W] in [0, 1], as diffusers' pipelines decode them (their VAE's latents mean and
    std, or scaling and shift factors); differentiable. ``upcast``: a half-precision VAE marked ``force_upcast``
    decodes in float32, as the pipelines upcast it (it overflows to NaN otherwise)."""
    vae, config = pipe.vae, pipe.vae.config
    dtype = torch.float32 if upcast and vae.dtype == torch.float16 and getattr(config, "force_upcast", False) else None
    latents = latents.to(dtype or vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean, std = (
            torch.tensor(values, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            for values in (config.latents_mean, config.latents_std)
        )
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    with _in_dtype(vae, dtype):
        return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


@contextlib.contextmanager
def _in_dtype(module: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The module in ``dtype`` for a while (None: as it is)."""
    original = next(module.parameters()).dtype
    if dtype is None or original == dtype:
        yield
        return
    module.to(dtype)
    try:
        yield
    finally:
        module.to(original)
