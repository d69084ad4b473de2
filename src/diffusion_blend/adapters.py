"""LoRA basis members that share one base module: which adapters it holds, and routing rows of a batch to them.

A LoRA member is evaluated on the shared base by peft's mixed-adapter batches: every peft tuner layer accepts
``adapter_names`` (one adapter per row, ``"__base__"`` for none). Diffusers' denoisers do not pass that argument
through their ``forward``, so :class:`AdapterRouter` injects it with forward pre-hooks on the tuner layers. The
adapters' activation (``set_adapter``) is never touched, so the pipeline outside a blend behaves as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

#: peft's routing name for "no adapter" in a mixed-adapter batch.
NO_ADAPTER = "__base__"


def tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """All peft tuner layers (LoRA-wrapped Linear/Conv layers) inside ``module``."""
    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def loaded_adapters(module: nn.Module) -> set[str]:
    """Names of the LoRA adapters loaded anywhere in ``module``."""
    names: set[str] = set()
    for layer in tuner_layers(module):
        names.update(_layer_adapters(layer))
    return names


def _layer_adapters(layer: BaseTunerLayer) -> set[str]:
    return set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


class ActivationSnapshot:
    """The activation state of every tuner layer of a module (active adapters, enabled flag, requires_grad).

    Loading a LoRA with diffusers activates it; restoring a snapshot taken before the load leaves the new adapter
    loaded but inactive, so the pipeline keeps behaving exactly as it did.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers = {id(layer): (list(layer.active_adapters), layer.disable_adapters) for layer in tuner_layers(module)}
        self.model_active = next(iter(self.layers.values()))[0] if self.layers else []
        self.requires_grad = {id(p): p.requires_grad for p in module.parameters()}

    def restore(self) -> None:
        for layer in tuner_layers(self.module):
            active, disabled = self.layers.get(id(layer), (self.model_active, False))
            layer.set_adapter(active)
            if disabled:
                layer.enable_adapters(False)
        for parameter in self.module.parameters():
            parameter.requires_grad_(self.requires_grad.get(id(parameter), False))


class AdapterRouter:
    """Sends each row of a batch through one LoRA adapter of ``module`` (or none) during a forward call.

    Use ``with router:`` around one or many forward calls (it installs the hooks and checks the adapters' state),
    and ``with router.route(names):`` around each call, where ``names`` is one adapter name for the whole batch or
    a list with one name per row.
    """

    def __init__(self, module: nn.Module, adapters: Sequence[str]):
        self.module = module
        self.adapters = set(adapters)
        self.layers = [layer for layer in tuner_layers(module) if _layer_adapters(layer) & self.adapters]
        self._routes: str | list[str] | None = None
        self._depth = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._snapshot: ActivationSnapshot | None = None

    def __enter__(self) -> AdapterRouter:
        if self._depth == 0:
            self._check_state()
            disabled = [layer for layer in self.layers if layer.disable_adapters]
            if disabled:  # e.g. after pipe.disable_lora(): routing needs the layers on, restored on exit
                self._snapshot = ActivationSnapshot(self.module)
                for layer in disabled:
                    layer.enable_adapters(True)
            self._handles = [layer.register_forward_pre_hook(self._inject, with_kwargs=True) for layer in self.layers]
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if self._snapshot is not None:
                self._snapshot.restore()
                self._snapshot = None

    @contextlib.contextmanager
    def route(self, names: str | list[str]) -> Iterator[None]:
        """Route the forward calls made inside the block: one adapter (or ``NO_ADAPTER``) or one per row."""
        if self._depth == 0:
            raise RuntimeError("AdapterRouter.route() must be used inside `with router:`")
        previous, self._routes = self._routes, names
        try:
            yield
        finally:
            self._routes = previous

    def _inject(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._routes is None:
            return None
        rows = len(args[0]) if args else len(next(iter(kwargs.values())))
        if isinstance(self._routes, str):
            names = [self._routes] * rows
        elif len(self._routes) == rows:
            names = self._routes
        else:
            raise ValueError(
                f"a per-row adapter routing of {len(self._routes)} rows met a layer input with {rows} rows; "
                "this denoiser reshapes its batch, so its LoRA members cannot be mixed within one call"
            )
        return args, {**kwargs, "adapter_names": names}

    def _check_state(self) -> None:
        merged = [layer for layer in tuner_layers(self.module) if layer.merged]
        if merged:
            raise ValueError(
                "the denoiser has fused (merged) LoRA adapters; blending LoRA members needs them unfused "
                "(pipe.unfuse_lora()) or unloaded after fusing (pipe.fuse_lora(); pipe.unload_lora_weights())"
            )
        foreign = set()
        for layer in tuner_layers(self.module):
            if not layer.disable_adapters:
                foreign.update((set(layer.active_adapters) & _layer_adapters(layer)) - self.adapters)
        if foreign:
            raise ValueError(
                f"adapter(s) {', '.join(sorted(map(repr, foreign)))} are active on the denoiser but are not basis "
                "members; a blend evaluates the base without them. Deactivate them (pipe.set_adapters([...]) or "
                "pipe.disable_lora()) or fuse them into the base (pipe.fuse_lora(); pipe.unload_lora_weights())"
            )
