"""Compiled and vmapped denoiser calls.

Full members of one architecture can run in one ``torch.vmap`` call over their stacked weights (what
``torch.func.stack_module_state`` makes), and any call of the blend can go through ``torch.compile``. The functions
compiled here take what varies from call to call as inputs — the stacked weights, the LoRA routing mask — so one
graph serves every weight mix, λ and stochastic draw that stacks as many rows.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import is_compiled_module
from torch import nn
from torch.func import functional_call

from .adapters import AdapterRouter
from .predictions import cloned, prediction_of, with_prediction


def compile_options(compile: bool | Mapping[str, Any] | None, given_compiled: bool) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the blend's calls, or None for eager calls."""
    if compile is None:
        return {} if given_compiled else None
    if isinstance(compile, bool):
        return {} if compile else None
    if not isinstance(compile, Mapping):
        raise ValueError(f"compile must be True, False, None or a dict of torch.compile options, got {compile!r}")
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(compile) - accepted)
    if unknown:
        raise ValueError(
            f"unknown torch.compile option(s) {', '.join(unknown)} (accepted: {', '.join(sorted(accepted))})"
        )
    return dict(compile)


def was_compiled(module: object) -> bool:
    """Whether a module was given compiled: wrapped by ``torch.compile(module)``, or compiled in place, whole or by
    regions (``module.compile()``, diffusers' ``compile_repeated_blocks``)."""
    if is_compiled_module(module):
        return True
    inner = module.modules() if isinstance(module, nn.Module) else ()
    return any(getattr(part, "_compiled_call_impl", None) is not None for part in inner)


class CompiledCalls:
    """``function(*inputs)`` compiled with the blend's options, one compiled function per kind of call.

    Module hooks are guarded (TorchDynamo skips hook guards by default), so a graph traced before a hook was added
    or removed (the user's, an offloading library's) is never reused after."""

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)
        self._functions: dict[str, Callable] = {}
        extra = self.options.get("options") or {}
        #: whether torch.compile may replay CUDA graphs, whose outputs the next replay overwrites
        self.graphed = self.options.get("mode") in ("reduce-overhead", "max-autotune") or bool(
            extra.get("triton.cudagraphs")
        )

    def __call__(self, kind: str, function: Callable, *inputs: Any) -> Any:
        if kind not in self._functions:
            self._functions[kind] = torch.compile(function, **self.options)
        if self.graphed:  # each call is a step of its own: its outputs are cloned before the next call replays a graph
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            output = self._functions[kind](*inputs)
        return with_prediction(output, cloned(prediction_of(output))) if self.graphed else output


def call_module(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A plain denoiser call (compiled as one kind of call)."""
    return module(*args, **kwargs)


def call_routed(router: AdapterRouter, mask: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A call of the shared base with its rows routed by ``mask``: setting the router's mask inside the traced
    function makes it an input of the graph, so new routings reuse the graph."""
    router.row_mask = mask
    try:
        return module(*args, **kwargs)
    finally:
        router.row_mask = None


def call_vmapped(template: nn.Module, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
    """Full members on the same inputs in one ``torch.vmap`` call of ``template`` (a weightless copy of their
    architecture) over their stacked weights: the denoiser's output type, every field stacked over members."""

    def call(member_params, member_buffers):
        return functional_call(template, (member_params, member_buffers), args, kwargs)

    return torch.vmap(call)(params, buffers)


class StackedMembers(NamedTuple):
    """Full members' weights stacked for a vmapped call, with what they were stacked from."""

    key: tuple  #: the members' weights (data pointers and versions) and the first member's call settings
    params: dict
    buffers: dict
    template: nn.Module  #: a weightless copy of their architecture


class StackedWeights:
    """The stacked weights of each group of full members vmapped together, kept while their weights (and the first
    member's settings the weightless copy carries) are unchanged; a member's weights are stacked for one group at a
    time."""

    def __init__(self, mark_static: bool):
        self.mark_static = mark_static  # compiled calls: weights, not inputs (CUDA graphs must not copy them)
        self._groups: dict[tuple[str, ...], StackedMembers] = {}

    def of(self, names: list[str], modules: list[nn.Module], call_state: tuple) -> StackedMembers:
        weights = (
            (name, *((p.data_ptr(), p._version) for p in module.parameters())) for name, module in zip(names, modules)
        )
        key = (call_state, *weights)
        cached = self._groups.get(tuple(names))
        if cached is not None and cached.key == key:
            return cached
        self._groups = {group: entry for group, entry in self._groups.items() if not set(group) & set(names)}
        params, buffers = stacked_state(modules)
        if self.mark_static:
            for tensor in (*params.values(), *buffers.values()):
                torch._dynamo.mark_static_address(tensor)
        stacked = StackedMembers(key, params, buffers, copy.deepcopy(modules[0]).to("meta"))
        self._groups[tuple(names)] = stacked
        return stacked


def stacked_state(modules: list[nn.Module]) -> tuple[dict, dict]:
    """The modules' parameters and buffers stacked along a new first axis, for a vmapped call: what
    ``torch.func.stack_module_state`` makes, for inference (it refuses members whose parameters differ in
    ``requires_grad``: a module the user made beside ones the blend loaded frozen)."""
    states = []
    with torch.no_grad():
        for named in (nn.Module.named_parameters, nn.Module.named_buffers):
            per_module = [dict(named(module)) for module in modules]
            states.append({name: torch.stack([tensors[name] for tensors in per_module]) for name in per_module[0]})
    return states[0], states[1]
