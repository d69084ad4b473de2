"""What a full basis member must share with the base to be blended with it, checked before any sampling.

A member of another architecture, prediction type, device or dtype, or with settings pipelines put on their
denoiser alone (FreeU, an IP-Adapter's scale, attention processors), would silently be blended as another model:
each check here raises a one-line error that names the member and the remedy.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.models.attention_processor import (
    PAGCFGHunyuanAttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGHunyuanAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
)
from torch import nn

from .adapters import NO_ADAPTER, weights_placed_on_call

#: diffusers' perturbed-attention-guidance processors: they take a call's rows as [unconditional;] conditional;
#: perturbed thirds or halves
PAG_PROCESSORS = (
    PAGIdentitySelfAttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
    PAGHunyuanAttnProcessor2_0,
    PAGCFGHunyuanAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
)
#: FreeU's factors, kept on each up block of a UNet (``enable_freeu``).
FREEU_FACTORS = ("s1", "s2", "b1", "b2")


def check_member_name(name: object) -> None:
    """A basis name keys module dictionaries (the members', peft's adapters): it cannot hold a '.', nor be a name
    torch modules already have (``train``, ``to``, ...)."""
    if not isinstance(name, str) or not name or any(c in name for c in ".,=") or name == NO_ADAPTER or name.isspace():
        raise ValueError(f"basis name {name!r} must be a non-empty string without '.', ',' or '='")
    if name in MODULE_ATTRIBUTES:
        raise ValueError(f"basis name {name!r} is the name of a torch module attribute: choose another")


#: what a torch module instance already has (methods, and fields such as ``training``): no basis may be named so
MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def splits_its_rows(processor_class: type) -> bool:
    """Whether an attention processor splits a call's rows into parts of different roles (perturbed-attention
    guidance): stacking members' rows in one call would mix those parts up."""
    return issubclass(processor_class, PAG_PROCESSORS)


def attention_layers(module: nn.Module) -> list[nn.Module]:
    """The module's attention layers: those with an attention processor (which pipelines may swap)."""
    return [part for part in module.modules() if hasattr(part, "processor")]


# -------------------------------------------------------------------------------------------- architecture and kind
def check_same_architecture(name: str, base: nn.Module, member: nn.Module) -> None:
    """Raise unless ``member`` has the base's class and configuration (or, without a config, its parameter shapes)."""
    if type(member) is not type(base):
        raise ValueError(f"member {name!r} is a {type(member).__name__}, the base is a {type(base).__name__}")
    base_config, member_config = _comparable_config(base), _comparable_config(member)
    if base_config is not None and member_config is not None:
        differing = [
            f"{key}: {member_config.get(key)!r} vs base {base_config.get(key)!r}"
            for key in sorted(set(base_config) | set(member_config))
            if _normalised(member_config.get(key)) != _normalised(base_config.get(key))
        ]
        if differing:
            raise ValueError(f"member {name!r} has a different architecture than the base ({'; '.join(differing)})")
        return
    base_shapes, member_shapes = _parameter_shapes(base), _parameter_shapes(member)
    if base_shapes != member_shapes:
        first = sorted(set(base_shapes.items()) ^ set(member_shapes.items()))[0]
        raise ValueError(f"member {name!r} has different parameters than the base (first difference: {first})")


def _comparable_config(module: nn.Module) -> dict | None:
    """The module's configuration as its code reads it: attribute first (diffusers sets some entries of its frozen
    config as attributes only, e.g. ``encoder_hid_dim_type`` when an IP-Adapter is loaded)."""
    config = getattr(module, "config", None)
    if config is None or not isinstance(config, Mapping):
        return None
    return {
        key: getattr(config, key, value)
        for key, value in config.items()
        if not key.startswith("_") and key != "prediction_type"
    }


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _parameter_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape, ignoring LoRA weights and peft's ``base_layer`` wrapping."""
    return {
        key.replace(".base_layer", ""): tuple(value.shape)
        for key, value in module.state_dict().items()
        if "lora_" not in key
    }


def declared_prediction_type(module: nn.Module) -> str | None:
    """The prediction type a module declares in its config (``prediction_type``), if any."""
    config = getattr(module, "config", None)
    if isinstance(config, Mapping):
        return config.get("prediction_type")
    return getattr(module, "prediction_type", None)


def check_prediction_types(base: nn.Module, members: Mapping[str, nn.Module]) -> None:
    declared = {"base": declared_prediction_type(base)}
    declared.update({f"member {name!r}": declared_prediction_type(module) for name, module in members.items()})
    known = {who: kind for who, kind in declared.items() if kind is not None}
    if len(set(known.values())) > 1:
        raise ValueError(
            "members must share one prediction type: "
            + ", ".join(f"{who} predicts {kind}" for who, kind in known.items())
        )


# ------------------------------------------------------------------------------------------- settings of the call
def check_same_settings(
    name: str, base: nn.Module, member: nn.Module, base_layers: list[nn.Module], member_layers: list[nn.Module]
) -> None:
    """Settings that pipelines put on their denoiser alone, outside its config — FreeU (``pipe.enable_freeu``), an
    IP-Adapter's scale (``pipe.set_ip_adapter_scale``) — must be the base's on every full member too, or the member
    is blended as another model."""
    for setting, base_value, member_value, describe, remedy in (
        (
            "FreeU settings",
            _freeu_settings(base),
            _freeu_settings(member),
            _describe_freeu,
            "call enable_freeu (or disable_freeu) on every full member too",
        ),
        (
            "IP-Adapter settings",
            _ip_adapter_scales(base_layers),
            _ip_adapter_scales(member_layers),
            _describe_scales,
            "load the IP-Adapter into every full member too, at the same scale",
        ),
    ):
        if member_value != base_value:
            raise ValueError(
                f"member {name!r} has other {setting} than the base ({describe(member_value)} vs base "
                f"{describe(base_value)}): {remedy}"
            )


def call_state(module: nn.Module, layers: list[nn.Module]) -> tuple:
    """What a call of a module depends on besides its weights and inputs, as far as diffusers' settings go."""
    return (_freeu_settings(module), tuple(type(layer.processor) for layer in layers), _ip_adapter_scales(layers))


def _describe_freeu(settings: tuple) -> str:
    return str(dict(zip(FREEU_FACTORS, settings[0]))) if settings and settings[0][0] is not None else "off"


def _describe_scales(scales: tuple) -> str:
    present = sorted({str(scale) for scale in scales if scale is not None})
    return f"scales {present}" if present else "none"


def _ip_adapter_scales(layers: list[nn.Module]) -> tuple:
    """Per attention layer, the scales of its IP-Adapter processor (one per loaded adapter), None without one."""
    return tuple(
        getattr(layer.processor, "scale", None) if hasattr(layer.processor, "to_k_ip") else None for layer in layers
    )


def _freeu_settings(module: nn.Module) -> tuple:
    return tuple(
        tuple(getattr(block, factor, None) for factor in FREEU_FACTORS) for block in getattr(module, "up_blocks", ())
    )


def check_processors_alike(
    base_layers: list[nn.Module], members_layers: Mapping[str, list[nn.Module]], kind: Any, what: str, remedy: str
) -> None:
    """Every full member's attention processors (member name → its attention layers) are of ``kind`` (a predicate on
    processor classes) exactly where the base's are: else the member computes attention another way than the base
    does in this call."""
    base = [kind(type(layer.processor)) for layer in base_layers]
    for name, member_layers in members_layers.items():
        _check_processors_alike(name, base, member_layers, kind, what, remedy)


def _check_processors_alike(
    name: str, base: list[bool], member_layers: list[nn.Module], kind: Any, what: str, remedy: str
) -> None:
    differing = [index for index, layer in enumerate(member_layers) if kind(type(layer.processor)) != base[index]]
    if differing:
        raise ValueError(
            f"member {name!r} has {what} on {len(differing)} attention layer(s) where the base has none, "
            f"or the reverse (e.g. its layer {differing[0]}: "
            f"{type(member_layers[differing[0]].processor).__name__}): {remedy}"
        )


# ------------------------------------------------------------------------------------------------------- placement
def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a module: as diffusers reads them for its models (their compute dtype: modules kept in
    float32 in a half-precision model, ``_keep_in_fp32_modules``, and layerwise casting's storage do not count),
    else from the first floating-point parameter or buffer."""
    if isinstance(module, ModelMixin):
        return module.device, module.dtype
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def check_placement(base: nn.Module, members: Mapping[str, nn.Module], vmapped: bool) -> None:
    """Full members on the base's device in its dtype (offloaded together with it, if at all)."""
    device, dtype = placement(base)
    for name, module in members.items():
        member_device, member_dtype = placement(module)
        _check_offloaded(name, device, member_device, vmapped)
        if vmapped:
            _check_unhooked(name, module)
        if (member_device, member_dtype) != (device, dtype):
            raise ValueError(
                f"member {name!r} is on {member_device} in {member_dtype}, the base on {device} in {dtype}; "
                "move it with .to(...) first"
            )


def _check_offloaded(name: str, base_device: torch.device, member_device: torch.device, vmapped: bool) -> None:
    """Full members may be offloaded sequentially (accelerate's hooks place each weight when its module is called,
    so a member's own call works) only together with the base, and not vmapped (vmap reads the weights)."""
    offloaded = [
        which
        for which, device in ((f"member {name!r}", member_device), ("the base", base_device))
        if device.type == "meta"
    ]
    if not offloaded:
        return
    parked = (
        f"{offloaded[0]} is offloaded (its weights wait on the meta device, as enable_sequential_cpu_offload "
        "leaves them)"
    )
    if vmapped:
        raise ValueError(f"{parked}; vmap_full_members reads the members' weights: use vmap_full_members=False")
    if len(offloaded) == 1:
        raise ValueError(f"{parked} and the other is not: offload the base and every full member alike, or none")


def _check_unhooked(name: str, member: nn.Module) -> None:
    """A vmapped member is run as a weightless copy of its architecture over stacked weights: hooks on the member
    (the user's, an offloading library's) would not run for it, or would run for every member (the copy's)."""
    hooked = next(
        (
            part or "the module itself"
            for part, module in member.named_modules()
            if module._forward_hooks or weights_placed_on_call(module)
        ),
        None,
    )
    if hooked is not None:
        raise ValueError(
            f"member {name!r} carries hooks (on {hooked!r}) that a vmapped call cannot run per member: "
            "remove them or use vmap_full_members=False"
        )
