"""Stage: one denoiser of a pipeline with its basis models loaded on it (LoRAs) or beside it (full denoisers).

A pipeline blends one stage per denoiser it samples with: one for most pipelines, one per expert for those that
switch denoisers during sampling (Wan 2.2's ``transformer`` for high noise, ``transformer_2`` for low). A stage
reads and checks every basis source before it touches the pipeline, loads them, makes the stage's
:class:`~diffusion_blend.denoiser.BlendedDenoiser`, and swaps it in for the duration of a pipeline call.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .adapters import ActivationSnapshot
from .caches import reads_condition_cache
from .checks import declared_prediction_type
from .denoiser import BlendedDenoiser
from .loading import (
    LoraFile,
    check_finite,
    is_denoiser_folder,
    module_path,
    read_lora,
    read_scheduler_prediction_type,
    resolve_source,
    scheduler_prediction_type,
    text_encoder_keys,
)

#: A basis model's source: a path or hub id, a module, or one of those per denoiser of the pipeline
BasisSource = str | os.PathLike | nn.Module | Mapping[str, "str | os.PathLike | nn.Module | None"]


class Stage:
    """One denoiser of ``pipe`` (the attribute ``denoiser_name``) blended with ``basis`` (name → its source for
    this denoiser; None: the basis leaves it unchanged). ``evaluation``: :class:`BlendedDenoiser`'s keyword
    arguments."""

    def __init__(self, pipe: Any, denoiser_name: str, basis: Mapping[str, BasisSource | None], evaluation: dict):
        self.pipe = pipe
        self.denoiser_name = denoiser_name
        if not isinstance(getattr(pipe, denoiser_name, None), nn.Module):
            raise ValueError(f"{type(pipe).__name__} has no module {denoiser_name!r} to blend (denoiser=...)")
        self.held: nn.Module = getattr(pipe, denoiser_name)  # what the pipeline holds (maybe a compiled wrapper)
        self.base: nn.Module = unwrap_module(self.held)
        self.owned: dict[str, nn.Module] = {}  # full members this stage loaded from paths
        resolved = {name: self._resolve(name, source) for name, source in basis.items()}
        loaded: list[str] = []
        snapshot = ActivationSnapshot(self.base)
        try:
            members: dict[str, nn.Module | str] = {}
            for name, source in resolved.items():
                if isinstance(source, LoraFile):
                    self._load_lora(name, source)
                    loaded.append(name)
                    members[name] = name
                else:
                    members[name] = source
            snapshot.restore()  # the new adapters stay loaded, inactive and frozen
            self.denoiser: BlendedDenoiser | None = BlendedDenoiser(self.held, members, **evaluation)
        except Exception:
            if loaded:
                self.base.delete_adapters(loaded)
            snapshot.restore()
            raise
        self.lora_names = loaded

    def unload(self) -> None:
        """Remove the basis LoRAs from the denoiser and drop the loaded full members."""
        if self.lora_names:
            snapshot = ActivationSnapshot(self.base)
            self.base.delete_adapters(self.lora_names)
            snapshot.restore()
        self.lora_names = []
        self.owned.clear()
        self.denoiser = None

    def check_loaded(self) -> None:
        if self.denoiser is None:
            raise ValueError("this Blend was unloaded; make a new one")

    def check_usable(self) -> None:
        self.check_loaded()
        if getattr(self.pipe, self.denoiser_name) is self.denoiser:
            raise ValueError(
                "this Blend is in the middle of a call (blend() from a callback of its own call?): one call at a time"
            )
        if getattr(self.pipe, self.denoiser_name) is not self.held:
            raise ValueError(
                f"pipe.{self.denoiser_name} was replaced after the Blend was made; make a new Blend for the new one"
            )

    @contextlib.contextmanager
    def in_the_call(self) -> Iterator[None]:
        """The pipeline samples with the blend for the duration of the block: its denoiser swapped for the
        stage's, LoRA routing installed, and full members' attention processors given back after it."""
        with self._swapped(), self.denoiser.routing(), _attention_processors_kept(self.denoiser):
            yield

    # -------------------------------------------------------------------------------------------------------- loading
    def _resolve(self, name: str, source: BasisSource | None) -> LoraFile | nn.Module:
        """Read and check one basis source without touching the pipeline (None: this denoiser is the base's)."""
        if source is None:
            return self.base
        if isinstance(source, nn.Module):
            check_finite(name, "the module given", dict(source.named_parameters()))
            return source
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"basis {name!r} must be a path, a hub id or an nn.Module, got {type(source).__name__}")
        path = resolve_source(name, source, (self.denoiser_name,))
        if is_denoiser_folder(path):
            return self._read_denoiser(name, path)
        lora = read_lora(name, path)
        lora.state_dict, lora.network_alphas = self._pipeline_format(name, lora)
        self._check_lora_keys(name, lora)
        return lora

    def _read_denoiser(self, name: str, path: Path) -> nn.Module:
        subfolder = self.denoiser_name if (path / "model_index.json").is_file() else None
        self._check_denoiser_folder(name, path / subfolder if subfolder else path)
        base_kind = scheduler_prediction_type(dict(self.pipe.scheduler.config))
        member_kind = read_scheduler_prediction_type(path) if subfolder else None
        try:
            module, loading = type(self.base).from_pretrained(
                path, subfolder=subfolder, dtype=self.base.dtype, output_loading_info=True
            )
        except Exception as error:
            raise ValueError(
                f"basis {name!r}: cannot load a {type(self.base).__name__} from {path} ({error})"
            ) from error
        missing = loading.get("missing_keys") or []
        if missing:
            raise ValueError(
                f"basis {name!r}: the weights in {path} lack {len(missing)} of the "
                f"{type(self.base).__name__}'s parameters ({', '.join(sorted(missing)[:3])}, ...)"
            )
        check_finite(name, path, dict(module.named_parameters()))
        member_kind = member_kind or declared_prediction_type(module)
        if base_kind and member_kind and base_kind != member_kind:
            raise ValueError(f"basis {name!r} predicts {member_kind} but the pipeline's scheduler expects {base_kind}")
        self.owned[name] = module.to(self.base.device).eval().requires_grad_(False)
        _take_cache_processors(self.base, module)
        return self.owned[name]

    def _check_denoiser_folder(self, name: str, folder: Path) -> None:
        """A denoiser folder (or a pipeline's denoiser subfolder) exists and holds the base's model class."""
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(
                f"basis {name!r}: the pipeline folder {folder.parent} has no {folder.name} "
                f"(no {folder.name}/config.json)"
            )
        try:
            settings = json.loads(config.read_text())
            declared = _loaded_class_name(settings.get("_class_name"), settings)
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"basis {name!r}: {config} is not a readable model config ({error})") from error
        if declared is not None and declared != type(self.base).__name__:
            raise ValueError(
                f"basis {name!r}: {folder} holds a {declared}, but the pipeline's {self.denoiser_name} "
                f"is a {type(self.base).__name__}"
            )

    def _pipeline_format(self, name: str, lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict | None]:
        """Let the pipeline's own ``lora_state_dict`` convert formats it knows (kohya, A1111, ...)."""
        converter = getattr(self.pipe, "lora_state_dict", None)
        if converter is None:
            return lora.state_dict, None
        try:
            result = converter(dict(lora.state_dict))
        except Exception as error:
            raise ValueError(f"basis {name!r}: {lora.path} is not a LoRA this pipeline can read ({error})") from error
        if isinstance(result, tuple):
            return result[0], result[1] if len(result) > 1 and isinstance(result[1], dict) else None
        return result, None

    def _check_lora_keys(self, name: str, lora: LoraFile) -> None:
        if text_encoder_keys(lora.state_dict):
            raise ValueError(
                f"basis {name!r}: {lora.path} also adapts a text encoder ({text_encoder_keys(lora.state_dict)[0]}, "
                "...); blending needs one prompt encoding for all members, so only denoiser LoRAs are supported"
            )
        prefix = self._lora_prefix(lora.state_dict)
        keys = [key.removeprefix(f"{prefix}.") if prefix else key for key in lora.state_dict]
        modules = dict(self.base.named_modules())
        targets = {module_path(key) for key in keys}
        unmatched = sorted(str(t) for t in targets if t is None or t not in modules)
        if not keys or len(unmatched) == len(targets):
            raise ValueError(
                f"basis {name!r}: the LoRA keys of {lora.path} match no module of the pipeline's "
                f"{self.denoiser_name} (e.g. {keys[0] if keys else 'no keys at all'})"
            )
        if unmatched:
            raise ValueError(
                f"basis {name!r}: {len(unmatched)} module(s) of {lora.path} are not in the pipeline's "
                f"{self.denoiser_name}: {', '.join(unmatched[:3])}{', ...' if len(unmatched) > 3 else ''}"
            )

    def _lora_prefix(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """The prefix of a LoRA's keys naming the denoiser (``transformer.…``), or None for unprefixed keys. A
        LoRA for Wan 2.2's ``transformer_2`` usually carries ``transformer.``, as diffusers saves it."""
        for prefix in dict.fromkeys((self.denoiser_name, family(self.denoiser_name))):
            if any(key.startswith(f"{prefix}.") for key in state_dict):
                return prefix
        return None

    def _load_lora(self, name: str, lora: LoraFile) -> None:
        prefix = self._lora_prefix(lora.state_dict)
        try:
            # diffusers' "missing keys" warning matches adapter names as substrings of other adapters' keys (a
            # LoRA named "b" reports every "…_blocks…" key of the others); the keys were checked above instead.
            with _quiet_logger("diffusers.utils.peft_utils"):
                self.base.load_lora_adapter(
                    lora.state_dict,
                    prefix=prefix,
                    adapter_name=name,
                    network_alphas=lora.network_alphas,
                    metadata=lora.metadata if not lora.network_alphas else None,
                    _pipeline=self.pipe,
                )
        except (RuntimeError, ValueError, TypeError, KeyError) as error:  # e.g. a LoRA made for another model size
            detail = str(error).strip().splitlines() if not isinstance(error, KeyError) else [f"no {error}"]
            raise ValueError(
                f"basis {name!r}: {lora.path} does not fit the pipeline's {self.denoiser_name} "
                f"({detail[-1] if detail else type(error).__name__})"
            ) from error

    # ------------------------------------------------------------------------------------------------------- calling
    def follow_base(self) -> None:
        """Keep the full members this stage loaded where the base is (e.g. after ``pipe.to``), tensor by tensor: a
        half-precision diffusers model keeps some modules in float32 (``_keep_in_fp32_modules``), and a member must
        compute as the base does."""
        if not self.owned:
            return
        default = (self.base.device, self.base.dtype)
        placements = {
            name.replace(".base_layer", ""): (tensor.device, tensor.dtype)
            for name, tensor in itertools.chain(self.base.named_parameters(), self.base.named_buffers())
        }
        for module in self.owned.values():
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
                device, dtype = placements.get(name, default)
                dtype = dtype if tensor.is_floating_point() else tensor.dtype
                if (tensor.device, tensor.dtype) != (device, dtype):
                    tensor.data = tensor.data.to(device=device, dtype=dtype)

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        """The pipeline's denoiser is the blend for the duration of the block, the base again after it."""
        setattr(self.pipe, self.denoiser_name, self.denoiser)
        try:
            yield
        finally:
            setattr(self.pipe, self.denoiser_name, self.held)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _take_cache_processors(base: nn.Module, member: nn.Module) -> None:
    """A member loaded for a pipeline gets the key/value-cache attention processors the pipeline gave its own
    denoiser (FLUX.2 Klein's KV pipeline sets them at its construction): without them it would ignore the cache."""
    processors = getattr(member, "attn_processors", None)
    if not processors:
        return
    base_processors = base.attn_processors
    taken = {
        name: type(base_processors[name])() if reads_condition_cache(type(base_processors.get(name))) else processor
        for name, processor in processors.items()
    }  # (a layer the base lacks: the architecture check says so)
    if any(taken[name] is not processors[name] for name in processors):
        member.set_attn_processor(taken)


def _loaded_class_name(declared: str | None, config: dict) -> str | None:
    """The model class diffusers loads a config's ``_class_name`` as: older PixArt and DiT checkpoints declare
    ``Transformer2DModel``, which diffusers remaps by their ``norm_type``."""
    try:
        from diffusers.models.model_loading_utils import _CLASS_REMAPPING_DICT
    except ImportError:  # (a diffusers without the remapping: names are taken as they are)
        return declared
    return _CLASS_REMAPPING_DICT.get(declared, {}).get(config.get("norm_type"), declared)


def family(denoiser_name: str) -> str:
    """``transformer`` for ``transformer_2``: the name its LoRA keys and folders carry in a one-denoiser pipeline."""
    return re.sub(r"_\d+$", "", denoiser_name)


@contextlib.contextmanager
def _attention_processors_kept(denoiser: BlendedDenoiser) -> Iterator[None]:
    """Full members get back the attention processors they had. Pipelines that install processors for their call
    (perturbed-attention guidance) walk the wrapper's modules, members included, as they should, but restore
    only what they read through the wrapper: the base's processors."""
    kept = [
        (member, member.attn_processors)
        for member in denoiser.modules_by_name.values()
        if hasattr(member, "attn_processors")
    ]
    try:
        yield
    finally:
        for member, processors in kept:
            member.set_attn_processor(processors)
