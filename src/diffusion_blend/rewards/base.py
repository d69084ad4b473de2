"""The reward interface, weighted sums, and what every reward model needs: locating weights and preparing images.

A reward is a callable ``reward(images, prompts) -> Tensor[B]`` with ``name`` and ``differentiable``; ``images`` is a
float tensor ``[B, 3, H, W]`` with values in [0, 1] (what a diffusers pipeline decodes with ``output_type="pt"``).
Differentiable rewards keep the autograd graph when the images require grad; otherwise scoring runs under
``torch.no_grad``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import read_weights_only
from ..hub import is_hub_id

#: Where rewards look for their weights when no path is given: ``$DIFFUSION_BLEND_<NAME>`` (one folder per reward).
ENV_PREFIX = "DIFFUSION_BLEND_"
#: Pixel values may overshoot [0, 1] by this much (decoders' rounding) before an image counts as out of range.
RANGE_SLACK = 1e-3


class RewardWeightsError(ValueError):
    """A reward's weights are neither local nor reachable; the message says which files to put where."""


class Reward(nn.Module):
    """Base class: subclasses implement :meth:`score` on validated inputs moved to the reward's device.

    A reward is always in evaluation mode: ``.train()`` (e.g. from a module that holds it) would switch its
    dropouts on and make its scores random, so it is ignored.
    """

    name: str = "reward"
    differentiable: bool = False

    def train(self, mode: bool = True) -> Reward:
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = self.check_inputs(images, prompts)
        track = self.differentiable and torch.is_grad_enabled() and images.requires_grad
        with torch.enable_grad() if track else torch.no_grad():
            return self.score(images.to(self.device), prompts)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: images must be a tensor [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be floats in [0, 1], got {images.dtype}")
        if not torch.isfinite(images.detach()).all():
            raise ValueError(f"{self.name}: images contain NaN or infinite values")
        low, high = (float(v) for v in images.detach().aminmax())
        if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
            raise ValueError(f"{self.name}: images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]")
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = list(prompts)
        if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"{self.name}: give one prompt (a string) per image: {len(images)} images, {len(prompts)} prompts"
            )
        return images, prompts

    @property
    def device(self) -> torch.device:
        tensor = next(iter((*self.parameters(), *self.buffers())), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        tensor = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()), None)
        return tensor.dtype if tensor is not None else torch.float32


class WeightedReward(Reward):
    """Σ w_i r_i over named rewards (``"ir=0.5,aes=0.5"``); differentiable when every part is."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        if set(rewards) != set(weights):
            raise ValueError(f"weights {sorted(weights)} and rewards {sorted(rewards)} do not match")
        self.names = list(weights)
        self.parts = nn.ModuleList(rewards[name] for name in self.names)  # names may hold dots: not ModuleDict keys
        self.weights = [float(weights[name]) for name in self.names]
        self.name = ",".join(f"{name}={weight:g}" for name, weight in weights.items())
        self.differentiable = all(reward.differentiable for reward in rewards.values())

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = None
        for reward, weight in zip(self.parts, self.weights):
            value = reward(images, prompts).float() * weight
            total = value if total is None else total + value
        return total


class FunctionReward(Reward):
    """A user's function ``f(images, prompts) -> Tensor[B]`` as a reward (``differentiable`` from the function's
    attribute of that name, default False)."""

    def __init__(self, function: Callable, name: str):
        super().__init__()
        self.function = function
        self.name = name
        self.differentiable = bool(getattr(function, "differentiable", False))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = self.function(images, prompts)
        values = torch.as_tensor(values, device=images.device)
        if values.shape != (len(images),):
            raise ValueError(f"{self.name} returned shape {tuple(values.shape)}, expected ({len(images)},)")
        return values


class ScoreHead(nn.Module):
    """The MLP that ImageReward and the LAION aesthetic predictor put on an embedding: Linear, Dropout(0.2),
    Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear (no activations, as released)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        dropouts = [0.2, 0.2, 0.1]
        for index, (inputs, outputs) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(inputs, outputs))
            if index < len(dropouts):
                layers.append(nn.Dropout(dropouts[index]))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "layers.") -> ScoreHead:
        """Build the head from released weights (``layers.0.weight`` ... ``layers.7.bias``), sizes read off them."""
        state = {key[len(prefix) - len("layers.") :]: value for key, value in state.items() if key.startswith(prefix)}
        linear = sorted({int(key.split(".")[1]) for key in state})
        if not linear:
            raise ValueError(f"no score-head weights ({prefix}N.weight) in the checkpoint")
        sizes = [state[f"layers.{linear[0]}.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in linear]
        head = cls(sizes)
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)


def load_exactly(model: nn.Module, state: dict[str, torch.Tensor], reward: str) -> None:
    """``load_state_dict`` that tolerates only missing non-persistent-looking buffers (position ids)."""
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{reward}: the checkpoint does not fit the model (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]})"
        )


# ------------------------------------------------------------------------------------------------- weights
def weights_source(reward: str, path_or_id: str | os.PathLike | None) -> Path | str | None:
    """Where a reward's weights are: a local ``Path`` (``path_or_id``, else ``$DIFFUSION_BLEND_<REWARD>``), a hub
    repository id (a ``path_or_id`` shaped ``owner/name`` that is not a local path), or None (the default source).
    A local-looking path that does not exist raises: a typo must not fall back to downloading the default."""
    if path_or_id is not None:
        path = Path(path_or_id).expanduser()
        if path.exists():
            return path
        text = str(path_or_id)
        if is_hub_id(text):
            return text
        raise RewardWeightsError(f"{reward}: {text} does not exist")
    variable = env_variable(reward)
    if os.environ.get(variable):
        path = Path(os.environ[variable]).expanduser()
        if not path.exists():
            raise RewardWeightsError(f"{reward}: ${variable} points to {path}, which does not exist")
        return path
    return None


def load_checkpoint(reward: str, path: Path) -> dict:
    """A ``.pt``/``.pth`` checkpoint read without running code (:mod:`diffusion_blend.checkpoints`)."""
    try:
        return read_weights_only(path)
    except ValueError as error:
        raise RewardWeightsError(f"{reward}: {error}") from None


def env_variable(reward: str) -> str:
    return ENV_PREFIX + "".join(c if c.isalnum() else "_" for c in reward.upper())


def missing_weights(reward: str, files: str, source: str, error: Exception | None = None) -> RewardWeightsError:
    """The one-line error for weights that are neither local nor reachable."""
    cause = f" ({type(error).__name__})" if error is not None else ""
    return RewardWeightsError(
        f"{reward}: weights not found{cause}. Needs {files} from {source}: put them in one folder and pass "
        f"path_or_id=FOLDER (CLI: --weights-path FOLDER) or set ${env_variable(reward)}=FOLDER"
    )


def load_or_explain(reward: str, files: str, source: str, load: Callable):
    """Run ``load()``; a missing file or an unreachable hub becomes :func:`missing_weights`' message."""
    try:
        return load()
    except RewardWeightsError:
        raise
    except (OSError, ValueError) as error:  # hub errors are OSErrors; "not a valid model identifier" ValueErrors
        raise missing_weights(reward, files, source, error) from error


# ------------------------------------------------------------------------------------------------- images
def resize_and_crop(images: torch.Tensor, shortest_edge: int, crop: tuple[int, int]) -> torch.Tensor:
    """CLIP-style preprocessing in torch (differentiable): bicubic resize of the shorter side to
    ``shortest_edge`` (antialiased, like PIL's; the longer side truncated like transformers'), then a centre crop
    to ``crop`` (height, width). Computed in float32 whatever the input dtype."""
    height, width = images.shape[-2:]
    scale = shortest_edge / min(height, width)
    size = (max(crop[0], int(height * scale)), max(crop[1], int(width * scale)))
    images = _resized(images, size)
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return images[..., top : top + crop[0], left : left + crop[1]]


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize`` (HPSv2's evaluation transform), differentiable: the longer side resized to
    ``size``, then black (0) padding to a square, split evenly with the extra pixel at the bottom/right."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new = (round(height * scale), round(width * scale))
    images = _resized(images, new)
    pad_h, pad_w = size - new[0], size - new[1]
    return nn.functional.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def _resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    images = images.float()  # half-precision bicubic resizing is missing on CPUs and imprecise elsewhere
    if tuple(images.shape[-2:]) == size:
        return images
    return nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [B, D] batches."""
    return (nn.functional.normalize(a, dim=-1) * nn.functional.normalize(b, dim=-1)).sum(-1)


__all__ = [
    "FunctionReward",
    "Reward",
    "RewardWeightsError",
    "ScoreHead",
    "WeightedReward",
    "cosine",
    "load_exactly",
    "load_or_explain",
    "missing_weights",
    "normalize",
    "letterbox",
    "resize_and_crop",
    "weights_source",
]
