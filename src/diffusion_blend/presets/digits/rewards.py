"""The embedded model's rewards, on images [B, 3, H, W] in [0, 1] whose ink is their channels' mean.

- ``legible`` (plays text-image alignment): log p(requested digit | image) under the shipped classifier;
  differentiable. The prompt is the digit.
- ``bold`` (plays an aesthetic): the percentage of the image inked, counted softly — 100·σ(12·(ink − ½)) per pixel
  on average, so a grey haze (ink well under ½) earns little; differentiable. In percent, so that one KL weight
  (α = 1 for the shipped basis models) tilts it as strongly as the others.
- ``stencil`` (an aesthetic, a black box): pieces − 1, with pieces the number of separate 4-connected ink shapes
  (ink > ½): an unbroken digit scores 0, each gap cut into its strokes one more, as in a stencil lettering; an
  empty image −1. Not differentiable: what the fine-tuner's black-box methods are for. It conflicts with ``bold``:
  fine-tuning for bold strokes closes the gaps (docs/digits.md has the numbers).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ...rewards.base import Reward
from .classifier import DigitClassifier
from .data import SIZE
from .pipeline import digit_labels, ink

#: ink above this counts as inked (``stencil``), and is where ``bold``'s soft count crosses one half
INK_THRESHOLD = 0.5
BOLD_SHARPNESS = 12.0
CLASSIFIER_FILE = "classifier.safetensors"


def _ink_16(images: torch.Tensor) -> torch.Tensor:
    """Ink at the model's 16×16 (other sizes resized, antialiased), in float32."""
    amount = ink(images.float())
    if amount.shape[-2:] != (SIZE, SIZE):
        amount = nn.functional.interpolate(amount, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return amount


class Legible(Reward):
    name = "legible"
    differentiable = True

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    @classmethod
    def load(cls, path_or_id=None) -> Legible:
        """The shipped classifier, or ``classifier.safetensors`` in the folder (or file) ``path_or_id``."""
        from . import weights_folder

        path = Path(path_or_id) if path_or_id is not None else weights_folder() / CLASSIFIER_FILE
        if path.is_dir():
            path = path / CLASSIFIER_FILE
        try:
            state = safetensors.torch.load_file(path)
        except (OSError, safetensors.SafetensorError) as error:
            raise ValueError(f"legible: cannot read the classifier {path} ({error})") from error
        classifier = DigitClassifier()
        classifier.load_state_dict(state)
        return cls(classifier)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([digit_labels(prompt)[0] for prompt in prompts], device=images.device)
        log_probabilities = torch.log_softmax(self.classifier(_ink_16(images)), dim=1)
        return log_probabilities.gather(1, labels[:, None])[:, 0]

    def check_inputs(self, images: torch.Tensor, prompts) -> tuple[torch.Tensor, list[str]]:
        images, prompts = super().check_inputs(images, prompts)
        for prompt in prompts:
            if len(digit_labels(prompt)) != 1:
                raise ValueError(f"legible: each prompt must be one digit, got {prompt!r}")
        return images, prompts


class Bold(Reward):
    name = "bold"
    differentiable = True

    @classmethod
    def load(cls, path_or_id=None) -> Bold:
        return cls()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return 100 * torch.sigmoid(BOLD_SHARPNESS * (_ink_16(images) - INK_THRESHOLD)).mean(dim=(1, 2, 3))


class Stencil(Reward):
    name = "stencil"
    differentiable = False

    @classmethod
    def load(cls, path_or_id=None) -> Stencil:
        return cls()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (pieces(_ink_16(images)[:, 0] > INK_THRESHOLD) - 1).float()


def pieces(mask: torch.Tensor) -> torch.Tensor:
    """The number of 4-connected components of each boolean image [B, H, W]: every inked pixel takes the largest
    index among its inked neighbours until nothing changes; each component ends labelled by its largest index, so
    it has exactly one pixel whose label is its own index."""
    height, width = mask.shape[1:]
    index = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, height, width)
    labels = torch.where(mask, index, torch.zeros((), device=mask.device))
    while True:
        padded = nn.functional.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([padded[:, 1:-1, :-2], padded[:, 1:-1, 2:], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]])
        spread = torch.where(mask, torch.maximum(labels, neighbours.amax(0)), labels)
        if torch.equal(spread, labels):
            break
        labels = spread
    return ((labels == index) & mask).sum(dim=(1, 2))
