"""What a pipeline reads of its denoiser, answered for a blend of several.

Pipelines treat the :class:`~diffusion_blend.denoiser.BlendedDenoiser` as their denoiser: they read its ``config``,
``dtype`` and ``device``, install attention processors, name cache contexts, enable step caches, and reach for other
attributes (``add_embedding``, ...). :class:`DenoiserFace` answers them from the base, and passes what changes a
model on to the base and every full member alike, so that a blend behaves as the model it stands in for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .caches import uses_step_cache
from .checks import placement


class DenoiserFace(nn.Module):
    """The face of a blended denoiser; subclasses hold ``base`` (the base module) and ``executor`` (whose
    ``modules()`` are the base and the full members, and ``step_contexts`` the per-call cache contexts)."""

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.base)[1]

    @property
    def device(self) -> torch.device:
        return placement(self.base)[0]

    def set_attn_processor(self, processor: Any) -> None:
        """Set the attention processors of the base and of every full member (diffusers' ``set_attn_processor``:
        one processor, or one per layer name, the base's names). Pipelines that install processors for their call
        (perturbed-attention guidance) put them on every attention layer of the wrapper, members' included, and
        restore them through this method: on the base alone, the members would keep the call's processors."""
        for module in self.executor.modules().values():
            module.set_attn_processor(dict(processor) if isinstance(processor, Mapping) else processor)  # (it pops)

    def cache_context(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager:
        """diffusers' ``cache_context``: the context a pipeline names for its denoiser call (``"cond"``,
        ``"uncond"``) for the step caches of the base and of the members (``enable_cache``). Each denoiser call of the
        blend runs in a context of its own within it (:class:`~diffusion_blend.caches.StepCacheContexts`)."""
        return self.executor.step_contexts.given(name, **kwargs)

    def enable_cache(self, config: Any) -> None:
        """diffusers' ``enable_cache`` (First Block Cache, TaylorSeer, MagCache, ...) on the base and on every full
        member: each module keeps its own cache state. LoRA members are cached with the base they share."""
        for module in self.executor.modules().values():
            module.enable_cache(config)

    def disable_cache(self) -> None:
        """diffusers' ``disable_cache`` on the base and on every full member that has a cache enabled."""
        for module in self.executor.modules().values():
            if uses_step_cache(module):
                module.disable_cache()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Forget what the step caches of the base and of the members computed (diffusers' pipelines call it at the
        end of their call, so that the next call starts afresh)."""
        for module in self.executor.modules().values():
            if hasattr(module, "_reset_stateful_cache"):
                module._reset_stateful_cache(recurse=recurse)

    def __getattr__(self, name: str) -> Any:
        """Public attributes the wrapper lacks come from the base (``add_embedding``, ``encoder_hid_proj``, ...).
        Private ones do not: hooks that libraries keep on a module (accelerate's ``_hf_hook``) belong to that
        module, and must not look installed on the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)
