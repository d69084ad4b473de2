"""Caches per denoiser call of the blend: condition caches, and the contexts of diffusers' step caches.

Condition caches. Some pipelines compute the attention keys and values of their condition tokens (a reference or
input image, the prompt) at the first denoising step and reuse them at every later one: FLUX.2 Klein's KV pipeline
(``kv_cache_mode="extract"`` returns the cache it made, ``"cached"`` takes it back) and Qwen-Image 2.1
(``use_kv_cache``: the pipeline's cache object is filled at ``"extract"`` and read at ``"cached"``). A cache holds
one model's keys and values, and a blend evaluates several models on the same input: so each denoiser call the blend
makes keeps a cache of its own, found again at the next step by the call's place in the blend's plan. The pipeline
only ever sees one cache (the one it passed, or the first call's), which stands for all of them.

Step caches. diffusers' caches enabled on a denoiser (``enable_cache``: First Block Cache, TaylorSeer, MagCache,
FasterCache, pyramid attention broadcast) keep one state per *cache context* — the name a pipeline gives each of its
denoiser calls, ``"cond"`` or ``"uncond"`` — and reuse at a step what the same context computed at earlier steps. The
blend calls the denoiser on other rows than the pipeline does (members stacked in one call, one call per member,
chunks): each of its calls gets a context of its own within the pipeline's, named after the call's place in the plan,
so that no call reuses what another one computed (a member's residuals for another member's rows).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

#: The attention processors that read or fill a condition key/value cache
CONDITION_CACHE_PROCESSORS = (Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor)
#: The denoiser arguments of the protocol: the cache, and whether the call makes it or reads it
CACHE_ARGUMENT, MODE_ARGUMENT = "kv_cache", "kv_cache_mode"
EXTRACT, CACHED = "extract", "cached"
CONDITION_CACHES_IN_STOCHASTIC_MODE = (
    "condition caches (kv_cache_mode) hold one model's keys and values, and the stochastic mode draws another member "
    "at every step: use mode='mix', or the pipeline without its cache (Qwen-Image 2.1: use_kv_cache=False; "
    "Flux2KleinPipeline for FLUX.2 Klein)"
)
#: The context diffusers' step caches use where a pipeline names none
DEFAULT_CONTEXT = "inference"


class ConditionCaches:
    """The condition caches of a blend's denoiser calls: per cache the pipeline holds, each call's own."""

    def __init__(self) -> None:
        self._kept: dict[int, dict[Hashable, Any]] = {}  # id of a cache the pipeline holds → {call: the call's own}
        #: (None where a call's own is that cache itself)
        self._mode: str | None = None
        self._given: Any = None
        self._made: dict[Hashable, Any] = {}

    @property
    def active(self) -> bool:
        """Whether the blended call in progress makes or reads condition caches."""
        return self._mode is not None

    def begin(self, kwargs: Mapping[str, Any]) -> None:
        """Start a blended denoiser call with the pipeline's arguments."""
        self._mode, self._given, self._made = kwargs.get(MODE_ARGUMENT), kwargs.get(CACHE_ARGUMENT), {}
        if self._mode not in (None, EXTRACT, CACHED):
            raise ValueError(f"{MODE_ARGUMENT}={self._mode!r} is not one the blend knows ({EXTRACT!r} or {CACHED!r})")
        if self._mode is None and self._given is not None:
            raise ValueError(
                f"{CACHE_ARGUMENT} is given without {MODE_ARGUMENT}: the blend cannot tell whether the "
                "call makes it or reads it"
            )
        if self._mode == CACHED and id(self._given) not in self._kept:
            raise ValueError(
                f"{MODE_ARGUMENT}='cached' with a cache this blend did not make: the cache must come "
                f"from a call of the same blend with {MODE_ARGUMENT}='extract' (each member has its own)"
            )

    def for_call(self, call: Hashable, kwargs: dict) -> dict:
        """A denoiser call's arguments with its own cache: a new empty one of the pipeline's kind where caches are
        made, the one the same call made where they are read."""
        if self._mode == EXTRACT and self._given is not None:
            own = copy.deepcopy(self._given)  # (empty until the call fills it)
        elif self._mode == CACHED:
            kept = self._kept[id(self._given)]
            if call not in kept:
                raise ValueError(
                    "the blend's denoiser calls changed since its condition caches were made (another "
                    "blend, row cap or batch between the extract step and this one)"
                )
            own = kept[call] if kept[call] is not None else self._given  # None: the cache the pipeline holds
        else:
            return kwargs
        self._made[call] = own
        return {**kwargs, CACHE_ARGUMENT: own}

    def after_call(self, call: Hashable, output: Any) -> None:
        """Keep the cache a call returned (FLUX.2 returns the one it made instead of filling one given)."""
        if self._mode == EXTRACT and self._given is None:
            self._made[call] = returned_cache(output)

    def end(self, result: Any) -> None:
        """Finish the blended call: after an extract step, its calls' caches are kept under the cache the pipeline
        holds (the one it passed, or the one the blended output returns), for as long as the pipeline holds it."""
        mode, given, made = self._mode, self._given, self._made
        self.reset()
        if mode != EXTRACT:
            return
        visible = given if given is not None else returned_cache(result)
        key = id(visible)
        # the cache the pipeline holds is kept by the pipeline, not here (kept here, it would never be let go)
        self._kept[key] = {call: None if own is visible else own for call, own in made.items()}
        try:
            weakref.finalize(visible, self._kept.pop, key, None)
        except TypeError:  # a cache that cannot be weakly referenced: kept until the next set_blend
            pass

    def reset(self) -> None:
        """Forget the blended call in progress (at its end, or when it failed): nothing of it is held."""
        self._mode, self._given, self._made = None, None, {}

    def clear(self) -> None:
        self.reset()
        self._kept.clear()


def caches_conditions(pipe: Any, denoiser: Any, pipeline_kwargs: Mapping[str, Any]) -> bool:
    """Whether a pipeline call will make condition caches, as far as its arguments tell before it runs: Qwen-Image
    2.1's ``use_kv_cache`` (on by default) with a causal-condition transformer, FLUX.2 Klein's KV pipeline (its
    key/value attention processors on the denoiser) given a reference image. (A call that makes them anyway is
    found at its first denoiser call.)"""
    parameter = inspect.signature(pipe.__call__).parameters.get("use_kv_cache")
    if parameter is not None and pipeline_kwargs.get("use_kv_cache", parameter.default):
        return bool(getattr(denoiser.config, "causal_condition", True))
    processors = getattr(denoiser, "attn_processors", {})
    return pipeline_kwargs.get("image") is not None and any(map(reads_condition_cache, map(type, processors.values())))


def reads_condition_cache(processor_class: type) -> bool:
    """Whether an attention processor reads or fills a condition key/value cache (FLUX.2 Klein's KV processors);
    others ignore the cache the denoiser is given."""
    return issubclass(processor_class, CONDITION_CACHE_PROCESSORS)


def returned_cache(output: Any) -> Any:
    """The cache in a denoiser output of the extract step: FLUX.2's ``(prediction, kv_cache)`` or its ``kv_cache``
    field."""
    if isinstance(output, Mapping):
        return output.get(CACHE_ARGUMENT)
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return output[1]
    return None


class StepCacheContexts:
    """The cache contexts of a blend's denoiser calls: the pipeline names its call's context on the blend (the
    blended denoiser's ``cache_context``); each of the blend's own calls of a module runs in a context of its own."""

    def __init__(self) -> None:
        self._given: tuple[str, dict] | None = None  # the pipeline's context: name and step information

    @contextlib.contextmanager
    def given(self, name: str, **kwargs: Any) -> Iterator[None]:
        """The pipeline's context for the denoiser calls inside (diffusers' ``cache_context(name, **kwargs)``)."""
        previous, self._given = self._given, (name, kwargs)
        try:
            yield
        finally:
            self._given = previous

    def for_call(self, module: Any, call: Hashable) -> contextlib.AbstractContextManager:
        """The context of one of the blend's calls of ``module``: the pipeline's, named apart by the call's place in
        the plan. Where the pipeline names none, a module with a cache enabled gets one named as diffusers' caches
        name theirs then (``"inference"``)."""
        if not hasattr(module, "cache_context") or (self._given is None and not uses_step_cache(module)):
            return contextlib.nullcontext()
        name, kwargs = self._given or (DEFAULT_CONTEXT, {})
        return module.cache_context(f"{name}/blend{call}", **kwargs)


def uses_step_cache(module: Any) -> bool:
    """Whether ``module`` has one of diffusers' step caches enabled (``enable_cache``)."""
    return bool(getattr(module, "is_cache_enabled", False))
