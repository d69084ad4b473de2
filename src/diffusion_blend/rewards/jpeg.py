"""JPEG compressibility (Black et al., DDPO 2023): minus the size in kB of the image saved as JPEG at quality 95."""

from __future__ import annotations

import io

import torch
from PIL import Image

from .base import Reward

QUALITY = 95


class JpegCompressibility(Reward):
    """−(JPEG size in kB at quality 95) of the image quantised to 8 bits, as DDPO defines it. Not differentiable."""

    name = "jpeg"
    differentiable = False

    @classmethod
    def load(cls, path_or_id=None) -> JpegCompressibility:
        if path_or_id is not None:
            raise ValueError("jpeg: this reward has no weights (path_or_id must be None)")
        return cls()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        sizes = []
        for array in pixels.numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=QUALITY)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, device=images.device)
