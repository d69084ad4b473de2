"""The data of the embedded model: scikit-learn's handwritten digits (1 797 images, 8×8, 16 grey levels), upsampled
to 16×16, with a fixed held-out split.

Pixel values are ink: 0 is the paper, 1 full ink. The diffusion model works on them scaled to [−1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = 16
DIGITS = 10
#: fraction of the images held out (classifier accuracy, sample quality) and the seed of the split
HELD_OUT, SPLIT_SEED = 0.2, 0


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 16, 16] with ink in [0, 1], labels [N]) — bilinear upsampling of the 8×8 originals."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "training the digits model needs scikit-learn: pip install 'diffusion-blend[train]'"
        ) from error
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    upsampled = nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return upsampled.clamp(0, 1), torch.tensor(digits.target, dtype=torch.long)


def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a fixed permutation, the last ``HELD_OUT`` of it held out."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = round(count * HELD_OUT)
    return order[:-held], order[-held:]


def shifted(images: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Each image moved by a random whole number of pixels (at most ``pixels``) in each direction, paper filling in."""
    padded = nn.functional.pad(images, (pixels,) * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + SIZE, dx : dx + SIZE] for i, (dy, dx) in enumerate(offsets.tolist())])
