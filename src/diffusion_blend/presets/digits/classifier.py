"""The digit classifier behind the ``legible`` reward: a three-layer CNN on 16×16 ink images."""

from __future__ import annotations

import torch
from torch import nn

from .data import DIGITS, SIZE, shifted


class DigitClassifier(nn.Module):
    """Logits over the ten digits of ink images [B, 1, 16, 16] in [0, 1]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width * (SIZE // 4) ** 2, DIGITS)

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ink).flatten(1))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> DigitClassifier:
    """Train on ``images`` (ink [N, 1, 16, 16]) with random one-pixel shifts; AdamW, cosine-decayed learning rate."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            rows = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(shifted(images[rows], generator)), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images).argmax(1) == labels).float().mean())
