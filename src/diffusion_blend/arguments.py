"""A denoiser call's arguments, family by family: which is the noisy sample, which the timestep, which carries the
LoRA scale, and which hold the batch's rows — so that a call on some rows of the batch (a member evaluated where
its weight is non-zero, a chunk of a stacked call) takes exactly those rows of every argument.

The tables below name the arguments of known denoisers that break the default rule (a tensor whose first size is
the batch size holds one row per sample; everything else is passed unchanged).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

#: Arguments of known denoisers that carry no batch dimension even when their first size equals the batch size
#: (Flux's positional ids are (sequence, 3), FLUX.3's reference ids too; rotary tables and positions — Allegro's
#: ``image_rotary_emb``, Kandinsky 6's ``visual_rope_pos`` — are per position; Wan VACE's control scales are one per
#: VACE layer; Cosmos's padding mask is (1, 1, height, width) whatever the batch, repeated inside;
#: HunyuanVideo-Framepack's frame indices are 1-D).
UNBATCHED_ARGUMENTS = frozenset(
    {
        "img_ids",
        "txt_ids",
        "image_cond_ids",
        "image_rotary_emb",
        "visual_rope_pos",
        "control_hidden_states_scale",
        "padding_mask",
        "indices_latents",
        "indices_latents_clean",
        "indices_latents_history_2x",
        "indices_latents_history_4x",
    }
)
#: Tensor arguments of known denoisers that may hold several consecutive rows per sample: Wan's first-and-last-frame
#: models (FLF2V, SkyReels-V2, ChronoEdit) take two image embeddings per sample and fold each pair into one.
GROUPED_ROWS = frozenset({"encoder_hidden_states_image"})
#: List arguments of known denoisers that hold one item per sample (Qwen-Image's ``img_shapes``, HiDream's
#: ``img_sizes``, JoyImage's ``shape_list``): a call on some rows of the batch takes those rows' items. Where the
#: sample itself is a list of per-sample tensors (Z-Image's ``x``), every list argument of the batch's length is.
PER_SAMPLE_LISTS = frozenset({"img_shapes", "img_sizes", "shape_list"})
#: Arguments of per-sample-list denoisers padded to the longest sample of the whole batch (Z-Image's ControlNet
#: residuals): a call on only some of the samples pads its sequences to its own longest, and cannot take them.
PADDED_TO_THE_BATCH = frozenset({"controlnet_block_samples"})
#: Tensor arguments of known denoisers whose batch is not their first axis: HiDream's Llama-3 states are stacked
#: per layer, (layers, batch, tokens, width).
BATCH_AXES = {"encoder_hidden_states_llama3": 1}
#: Names of a denoiser's timestep argument (the stochastic draws are kept across calls at one timestep).
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
#: The arguments in which diffusers' denoisers take the LoRA scale, as ``{"scale": s}`` (their ``apply_lora_scale``).
LORA_SCALE_ARGUMENTS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


class CallSignature:
    """Where a denoiser takes its sample, timestep and LoRA scale, read once from its ``forward``'s signature."""

    def __init__(self, module: nn.Module):
        self.signature = inspect.signature(module.forward)
        self.parameter_names = list(self.signature.parameters)
        self.sample_name, self._timestep = _sample_and_timestep_parameters(module, self.signature)
        self.lora_scale_name = lora_scale_parameter(self.parameter_names)

    def sample(self, args: tuple, kwargs: dict) -> Any:
        return args[0] if args else kwargs[self.sample_name]

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        if self._timestep is None:
            return None
        name, position = self._timestep
        return args[position] if len(args) > position else kwargs.get(name)

    def lora_scale(self, kwargs: dict) -> float:
        return lora_scale_of(self.lora_scale_name, kwargs)

    def on_rows(self, module: nn.Module, args: tuple, kwargs: dict, rows: torch.Tensor, batch: int, listed: bool):
        """The arguments of a call on some ``rows`` of a ``batch`` (``listed``: the sample is a per-sample list):
        batched tensors indexed (on their :data:`BATCH_AXES`; :data:`GROUPED_ROWS` by sample), per-sample lists
        (:data:`PER_SAMPLE_LISTS`; every list of the batch's length where the sample is a list) taken item by
        item."""
        host_rows = functools.cache(rows.tolist)  # read back only where a per-sample list needs it

        def take(name: str | None, value: Any) -> Any:
            if name in UNBATCHED_ARGUMENTS:
                return value
            if isinstance(value, list) and len(value) == batch and (listed or name in PER_SAMPLE_LISTS):
                return [value[row] for row in host_rows()]
            if listed and name in PADDED_TO_THE_BATCH and value is not None and set(host_rows()) != set(range(batch)):
                raise ValueError(
                    f"{type(module).__name__} pads {name} to the longest sample of the whole batch, so the blend "
                    "cannot call it on some samples only (stochastic mode with full members or batch_members=False, "
                    "a max_batch_size below the batch): use LoRA members batched, and max_batch_size None or 'input'"
                )
            if name in GROUPED_ROWS and isinstance(value, torch.Tensor) and _groups_rows(value, batch):
                return value.unflatten(0, (batch, -1))[rows.to(value.device)].flatten(0, 1)
            axis = BATCH_AXES.get(name, 0)
            if axis and isinstance(value, torch.Tensor) and value.ndim > axis and value.shape[axis] == batch:
                return value.index_select(axis, rows.to(value.device))
            return take_rows(value, rows, batch)

        names = itertools.chain(self.parameter_names, itertools.repeat(None))
        return tuple(map(take, names, args)), {key: take(key, value) for key, value in kwargs.items()}


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to some rows of the batch: tensors whose first size is the batch size are indexed,
    containers are walked, everything else (timesteps given as scalars, options) is passed unchanged."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return type(value)({key: take_rows(item, rows, batch) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(item, rows, batch) for item in value)
    return value


def _groups_rows(value: torch.Tensor, batch: int) -> bool:
    """Whether a :data:`GROUPED_ROWS` tensor holds several rows per sample (its first size a multiple of the batch)."""
    return value.ndim > 0 and value.shape[0] > batch and value.shape[0] % batch == 0


def _sample_and_timestep_parameters(
    module: nn.Module, signature: inspect.Signature
) -> tuple[str, tuple[str, int] | None]:
    """The name of the denoiser's first parameter (the noisy sample), and the name and position of its timestep:
    the parameter named so (SD3's and Flux's transformers take ``encoder_hidden_states`` second), else the second."""
    parameters = list(signature.parameters.values())
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if not parameters or parameters[0].kind in variadic:
        raise ValueError(f"cannot tell which argument of {type(module).__name__}.forward is the noisy sample")
    names = [parameter.name for parameter in parameters]
    named = next((name for name in TIMESTEP_NAMES if name in names), None)
    if named is not None:
        return names[0], (named, names.index(named))
    if len(parameters) > 1 and parameters[1].kind not in variadic:
        return names[0], (names[1], 1)
    return names[0], None


def lora_scale_parameter(parameters: Iterable[str]) -> str | None:
    """Which of a function's parameters (a denoiser's, a pipeline's) carries the LoRA scale (None: none does)."""
    return next((name for name in LORA_SCALE_ARGUMENTS if name in parameters), None)


def lora_scale_of(name: str | None, kwargs: dict) -> float:
    """The LoRA scale a denoiser call carries: ``{"scale": s}`` in its attention keyword argument, where diffusers'
    ``apply_lora_scale`` reads it (1 without one)."""
    attention_kwargs = kwargs.get(name) if name is not None else None
    if not attention_kwargs or "scale" not in attention_kwargs:
        return 1.0
    scale = attention_kwargs["scale"]
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{name}['scale'] (the LoRA scale) must be a finite number, got {scale!r}")
    return float(scale)
