"""Training the embedded model's base: denoising score matching on the digits, a null class for guidance.

v-prediction on the cosine schedule, 15% of the labels dropped to the null class (classifier-free guidance), random
one-pixel shifts, AdamW with a linear warm-up and a cosine decay, and an exponential moving average of the weights
(the shipped model). Seeded: the same seed and steps give the same weights on the same machine.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import DDPMScheduler

from .data import shifted
from .pipeline import NULL_CLASS, DigitsPipeline, scheduler_config

#: fraction of labels replaced by the null class
LABEL_DROPOUT = 0.15


def train_base(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 2500,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup: int = 100,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress=None,
) -> DigitsPipeline:
    """A trained :class:`DigitsPipeline` (the moving average of the weights) from ink ``images`` [N, 1, 16, 16]."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipe = DigitsPipeline.fresh()
    model = pipe.unet.train()
    average = copy.deepcopy(model).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(**scheduler_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, steps))
    for step in range(steps):
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        x0 = 2 * shifted(images[rows], generator) - 1
        class_labels = labels[rows].clone()
        class_labels[torch.rand(batch_size, generator=generator) < LABEL_DROPOUT] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_schedule.add_noise(x0, noise, timesteps)
        prediction = model(noisy, timesteps, encoder_hidden_states=None, class_labels=class_labels).sample
        loss = torch.nn.functional.mse_loss(prediction, noise_schedule.get_velocity(x0, noise, timesteps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for kept, current in zip(average.parameters(), model.parameters(), strict=True):
                kept.lerp_(current, 1 - decay)
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    pipe.unet = average
    pipe.register_modules(unet=average)
    return pipe


def _warmup_cosine(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor
