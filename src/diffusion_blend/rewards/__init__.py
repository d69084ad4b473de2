"""Rewards: the preferences a basis model is fine-tuned for, behind one interface.

    reward = get_reward("pickscore", path_or_id=None, device="cuda")
    scores = reward(images, prompts)          # images [B, 3, H, W] in [0, 1] → Tensor[B]
    mix = parse_reward("imagereward=0.5,aesthetic=0.5")
    mine = parse_reward("my_package.rewards:sharpness")   # a user function f(images, prompts) -> Tensor[B]

VILA (the method's aesthetic reward) was released for JAX/TensorFlow only and has no PyTorch weights; it is not
faked here. The closest substitute is the LAION aesthetic predictor v2 (``aesthetic``, alias ``aes``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..named_numbers import parse_named_numbers
from .base import FunctionReward, Reward, RewardWeightsError, WeightedReward


@dataclass(frozen=True)
class RewardInfo:
    """A registry entry: how to load the reward and what to tell users about it."""

    load: Callable[..., Reward]
    measures: str
    weights: str
    differentiable: bool
    licence: str


def _defined_in(path: str, **options) -> Callable[..., Reward]:
    """``Class.load`` of the reward class at ``module:Class`` (a path relative to this package), imported on first
    use: the registry names every reward without loading the libraries it needs, nor the packages that define some
    of them (the digits preset, the lab), which build on this one."""

    def load(*arguments):
        module, _, attribute = path.partition(":")
        return getattr(importlib.import_module(module, __package__), attribute).load(*arguments, **options)

    return load


REGISTRY: dict[str, RewardInfo] = {
    "imagereward": RewardInfo(
        _defined_in(".image_reward:ImageReward"),
        "text-image alignment and quality (human preferences, BLIP)",
        "THUDM/ImageReward (ImageReward.pt, med_config.json) + bert-base-uncased tokenizer",
        True,
        "Apache-2.0",
    ),
    "pickscore": RewardInfo(
        _defined_in(".clip:PickScore"),
        "human preference (Pick-a-Pic), CLIP-H",
        "yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor",
        True,
        "MIT",
    ),
    "hpsv2": RewardInfo(
        _defined_in(".clip:HPSv2", version="hpsv2"),
        "human preference (HPD v2), open_clip ViT-H-14",
        "xswu/HPSv2 (HPS_v2_compressed.pt) + CLIP-H tokenizer",
        True,
        "Apache-2.0",
    ),
    "hpsv2.1": RewardInfo(
        _defined_in(".clip:HPSv2", version="hpsv2.1"),
        "human preference (HPD v2, v2.1 weights), open_clip ViT-H-14",
        "xswu/HPSv2 (HPS_v2.1_compressed.pt) + CLIP-H tokenizer",
        True,
        "Apache-2.0",
    ),
    "aesthetic": RewardInfo(
        _defined_in(".clip:LaionAesthetic"),
        "aesthetics (LAION predictor v2 on CLIP ViT-L/14)",
        "sac+logos+ava1-l14-linearMSE.pth + openai/clip-vit-large-patch14",
        True,
        "Apache-2.0 (head), MIT (CLIP)",
    ),
    "clipscore": RewardInfo(
        _defined_in(".clip:ClipScore"),
        "text-image alignment, 2.5·max(cos, 0) (Hessel et al.)",
        "any CLIP checkpoint (default openai/clip-vit-base-patch32)",
        True,
        "MIT (OpenAI CLIP)",
    ),
    "jpeg": RewardInfo(
        _defined_in(".jpeg:JpegCompressibility"), "compressibility: −JPEG size in kB at quality 95", "none", False, "—"
    ),
    "legible": RewardInfo(
        _defined_in("..presets.digits.rewards:Legible"),
        "digits model: log-probability of the requested digit (classifier)",
        "shipped (presets/digits)",
        True,
        "Apache-2.0",
    ),
    "bold": RewardInfo(
        _defined_in("..presets.digits.rewards:Bold"),
        "digits model: fraction of the image inked (soft count)",
        "none",
        True,
        "—",
    ),
    "stencil": RewardInfo(
        _defined_in("..presets.digits.rewards:Stencil"),
        "digits model: separate ink pieces − 1 (gaps cut into the strokes)",
        "none",
        False,
        "—",
    ),
}
ALIASES = {
    "ir": "imagereward",
    "aes": "aesthetic",
    "laion-aesthetic": "aesthetic",
    "pick": "pickscore",
    "hps": "hpsv2.1",
    "compressibility": "jpeg",
}
#: ``lab:<name>``: the reward ``name`` of a lab scenario, loaded by ``LAB_REWARD(name, scenario_file_or_None)``
LAB_PREFIX = "lab:"
LAB_REWARD = _defined_in("..lab.reward:LabReward")


def list_rewards() -> dict[str, RewardInfo]:
    """Every registered reward (the lab's rewards load as ``lab:<name>``; user functions as ``module:function``)."""
    return dict(REGISTRY)


def get_reward(
    name: str, path_or_id=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Reward:
    """Load a reward by name (or alias), from ``path_or_id`` (a local folder/file or hub id) or its default source.

    ``lab:<reward>`` loads a lab scenario's quadratic reward (``path_or_id``: a scenario file); ``module:function``
    wraps a user function. Unknown names and missing weights raise ``ValueError`` with a one-line explanation.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith(LAB_PREFIX):
        reward = LAB_REWARD(name[len(LAB_PREFIX) :], path_or_id)
    elif ":" in name:
        reward = load_user_reward(name)
    else:
        key = ALIASES.get(name.lower(), name.lower())
        if key not in REGISTRY:
            known = ", ".join([*REGISTRY, *ALIASES])
            raise ValueError(f"unknown reward {name!r}; known: {known}, lab:<name>, or module:function")
        reward = REGISTRY[key].load(path_or_id)
    if device is not None or dtype is not None:
        reward = reward.to(device=device, dtype=dtype)
    return reward


def load_user_reward(path: str) -> Reward:
    """``package.module:function`` (or a Reward subclass / instance) as a reward."""
    target = _user_target(path)
    if isinstance(target, Reward):
        return target
    if isinstance(target, type):
        return target()
    return FunctionReward(target, path)


def _user_target(path: str):
    """What ``package.module:name`` names, checked to be a reward (a Reward subclass or instance, or a function of
    (images, prompts)) without building it."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"user reward {path!r} must look like module:function")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise ValueError(f"user reward {path!r}: cannot import {module_name} ({error})") from error
    except AttributeError:
        raise ValueError(f"user reward {path!r}: {module_name} has no {attribute!r}") from None
    if isinstance(target, Reward) or (isinstance(target, type) and issubclass(target, Reward)):
        return target
    if not callable(target):
        raise ValueError(f"user reward {path!r} is not callable")
    try:
        inspect.signature(target).bind(None, None)
    except TypeError as error:
        raise ValueError(f"user reward {path!r} must take (images, prompts) ({error})") from None
    except ValueError:  # a callable whose signature Python cannot read: found out at its first call
        pass
    return target


def parse_weighted(spec: str) -> dict[str, float]:
    """``"ir=0.5,aes=0.5"`` → ``{"ir": 0.5, "aes": 0.5}``; a bare name means weight 1."""
    return parse_named_numbers(spec, f"reward spec {spec!r}", bare=1.0)


def check_reward_spec(spec: str) -> bool:
    """Check every reward a spec names before any model is loaded (unknown names, user functions that do not import);
    return whether the reward is differentiable (every part is)."""
    differentiable = True
    for name in parse_weighted(spec):
        if name.startswith(LAB_PREFIX):
            continue
        if ":" in name:
            target = _user_target(name)  # (not built: a user reward class may load a model)
            differentiable &= bool(getattr(target, "differentiable", FunctionReward.differentiable))
            continue
        key = ALIASES.get(name.lower(), name.lower())
        if key not in REGISTRY:
            known = ", ".join([*REGISTRY, *ALIASES])
            raise ValueError(f"unknown reward {name!r}; known: {known}, lab:<name>, or module:function")
        differentiable &= REGISTRY[key].differentiable
    return differentiable


def parse_reward(spec: str, paths: dict[str, str] | None = None, device=None, dtype=None) -> Reward:
    """A reward from a spec: ``"pickscore"``, ``"ir=0.5,aes=0.5"`` (a weighted sum) or ``"module:function"``.

    ``paths`` maps reward names to their ``path_or_id``.
    """
    paths = paths or {}
    check_reward_spec(spec)  # every name, before any model loads
    weights = parse_weighted(spec)
    if len(weights) == 1 and next(iter(weights.values())) == 1 and "=" not in spec:
        name = next(iter(weights))
        return get_reward(name, paths.get(name), device=device, dtype=dtype)
    rewards = {name: get_reward(name, paths.get(name), device=device, dtype=dtype) for name in weights}
    return WeightedReward(rewards, weights)


__all__ = [
    "ALIASES",
    "Reward",
    "RewardWeightsError",
    "WeightedReward",
    "check_reward_spec",
    "get_reward",
    "list_rewards",
    "load_user_reward",
    "parse_reward",
    "parse_weighted",
]
