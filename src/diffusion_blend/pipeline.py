"""Blend: Diffusion Blend inside any diffusers pipeline.

The pipeline keeps doing everything it does (prompt encoding, CFG, scheduler, decoding, callbacks); for the
duration of one call its denoiser (``unet`` or ``transformer``) is swapped for a
:class:`~diffusion_blend.denoiser.BlendedDenoiser` that evaluates the base and basis models on the same input and
returns the blended prediction.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .adapters import ActivationSnapshot, loaded_adapters
from .caches import CONDITION_CACHES_IN_STOCHASTIC_MODE, caches_conditions, reads_condition_cache
from .denoiser import BlendedDenoiser, check_member_name, declared_prediction_type
from .loading import (
    DENOISER_FOLDERS,
    LoraFile,
    is_denoiser_folder,
    module_path,
    read_lora,
    read_scheduler_prediction_type,
    resolve_source,
    scheduler_prediction_type,
    text_encoder_keys,
)

BasisSource = str | os.PathLike | nn.Module | Mapping[str, "str | os.PathLike | nn.Module | None"]


class Blend:
    """A diffusers pipeline plus basis models, sampled with any blend of them.

    Args:
        pipe: any diffusers pipeline whose denoiser is ``pipe.unet`` or ``pipe.transformer``.
        basis: name → basis model. A path is a LoRA (a diffusers or peft LoRA folder, a ``.safetensors`` file, or
            the attention-processor ``pytorch_lora_weights.bin`` the method's checkpoints were published in),
            loaded on the pipeline's denoiser under that name; or a full denoiser folder (``config.json``) or
            pipeline folder (``model_index.json``). A module is a full fine-tuned denoiser. Hub ids
            (``owner/name``, or ``owner/name/FILE`` for one LoRA file of a repository) work online, and offline from
            the cache; of a pipeline repository only the denoiser is downloaded. For a pipeline that switches
            between denoisers during sampling (Wan 2.2: ``transformer`` for high noise, ``transformer_2`` for low),
            a basis is a source per denoiser, ``{"transformer": high, "transformer_2": low}``, and all are blended
            (a basis fine-tuned on one expert only gives ``None`` for the other: that expert's prediction is the
            base's, at no extra call).
        denoiser: the pipeline attribute(s) holding the denoiser(s) to blend, when not ``unet`` or ``transformer``
            (or the keys of per-denoiser sources); one of several blends that one's steps only.
        batch_members, max_batch_size, vmap_full_members, compile: how members are evaluated (see
            :class:`BlendedDenoiser`): by default the base and all LoRA members in one call on the shared base,
            compiled with ``torch.compile`` when the pipeline's denoiser was (``pipe.unet = torch.compile(...)``).

    Outside :meth:`blend` the pipeline behaves exactly as before: the basis LoRAs are loaded but inactive, and the
    activation of its own adapters is left as it was.
    """

    def __init__(
        self,
        pipe: Any,
        basis: Mapping[str, BasisSource],
        *,
        denoiser: str | Sequence[str] | None = None,
        batch_members: bool = True,
        max_batch_size: int | str | None = None,
        vmap_full_members: bool = False,
        compile: bool | Mapping[str, Any] | None = None,
    ):
        _check_basis_names(basis)
        names = _denoisers_to_blend(pipe, basis, denoiser)
        per_denoiser = _basis_per_denoiser(basis, names)
        _check_no_collision(pipe, basis, names)
        evaluation = dict(
            batch_members=batch_members,
            max_batch_size=max_batch_size,
            vmap_full_members=vmap_full_members,
            compile=compile,
        )
        self.experts: list[Blend] = []  # the pipeline's other denoisers blended alike (Wan 2.2's second expert)
        try:
            for other in names[1:]:
                expert = Blend.__new__(Blend)
                expert.experts = []
                expert._attach(pipe, other, per_denoiser[other], evaluation)
                self.experts.append(expert)
            self._attach(pipe, names[0], per_denoiser[names[0]], evaluation)
        except Exception:
            for expert in self.experts:
                expert.unload()
            raise

    def _attach(self, pipe: Any, denoiser_name: str, basis: Mapping[str, BasisSource], evaluation: dict) -> None:
        """Load the basis onto (or beside) one denoiser of the pipeline and make its BlendedDenoiser."""
        self.pipe = pipe
        self.denoiser_name = denoiser_name
        if not isinstance(getattr(pipe, denoiser_name, None), nn.Module):
            raise ValueError(f"{type(pipe).__name__} has no module {denoiser_name!r} to blend (denoiser=...)")
        self.held: nn.Module = getattr(pipe, denoiser_name)  # what the pipeline holds (maybe a compiled wrapper)
        self.base: nn.Module = unwrap_module(self.held)
        self.owned: dict[str, nn.Module] = {}  # full members this Blend loaded from paths
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
            self.denoiser = BlendedDenoiser(self.held, members, **evaluation)
        except Exception:
            if loaded:
                self.base.delete_adapters(loaded)
            snapshot.restore()
            raise
        self.lora_names = loaded

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        basis: Mapping[str, BasisSource],
        torch_dtype: torch.dtype | None = None,
        *,
        denoiser: str | Sequence[str] | None = None,
        batch_members: bool = True,
        max_batch_size: int | str | None = None,
        vmap_full_members: bool = False,
        compile: bool | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Blend:
        """Load the base pipeline with diffusers' ``DiffusionPipeline.from_pretrained`` and attach the basis.

        The basis paths are checked first, so a missing file is reported before a large model is loaded.
        ``dtype`` (diffusers' current name for ``torch_dtype``) is accepted too.
        """
        from diffusers import DiffusionPipeline

        if "dtype" in kwargs:
            if torch_dtype is not None:
                raise ValueError("give the pipeline's dtype once: torch_dtype or dtype, not both")
            torch_dtype = kwargs.pop("dtype")
        _check_basis_names(basis)
        for name, source in basis.items():
            for folder, part in source.items() if isinstance(source, Mapping) else [(denoiser, source)]:
                if part is not None and not isinstance(part, nn.Module):
                    resolve_source(name, part, (folder,) if isinstance(folder, str) else DENOISER_FOLDERS)
        pipe = DiffusionPipeline.from_pretrained(model_id_or_path, dtype=torch_dtype, **kwargs)
        return cls(
            pipe,
            basis,
            denoiser=denoiser,
            batch_members=batch_members,
            max_batch_size=max_batch_size,
            vmap_full_members=vmap_full_members,
            compile=compile,
        )

    @property
    def names(self) -> list[str]:
        """The basis names, in the order they were given."""
        self._check_loaded()
        return list(self.denoiser.names)

    @property
    def denoiser_names(self) -> list[str]:
        """The pipeline attributes blended: its denoiser, or each of its denoisers given a basis (Wan 2.2's experts).
        ``denoiser``, ``base``, ``lora_names`` and ``owned`` are the first one's; ``experts`` hold the others'."""
        return [stage.denoiser_name for stage in self._stages()]

    @property
    def has_lora_members(self) -> bool:
        """Whether any basis is a LoRA on any of the denoisers blended."""
        return any(stage.lora_names for stage in self._stages())

    def to(self, *args: Any, **kwargs: Any) -> Blend:
        """Move the pipeline (and the full-module members loaded from paths) like ``pipe.to``."""
        self.pipe.to(*args, **kwargs)
        for stage in self._stages():
            stage._follow_base()
        return self

    def blend(
        self,
        *args: Any,
        weights: Mapping[str, float] | Sequence[Mapping[str, float]],
        kl_scale: float | Sequence[float] = 1.0,
        mode: str = "mix",
        member_generator: torch.Generator | None = None,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Call the pipeline with its denoiser replaced by the blend; returns the pipeline's own output.

        Args:
            weights: basis name → w_i (names left out count as 0), or a list of them with one per image of the call
                (a sweep over weights in one batch: ``prompt=[p] * 3, weights=[w1, w2, w3]``).
            kl_scale: λ; 1 is the basis models' own KL strength, 0 the base model; or one per image of the call
                (a sweep over λ in one batch).
            mode: ``"mix"`` (DB-MPA / DB-KLA / joint) or ``"stochastic"`` (DB-MPA-LS: one member per sample
                and step, drawn with probability w; weights on the simplex).
            member_generator: generator for the stochastic draws; by default one seeded from the pipeline's
                ``generator`` (so a fixed seed reproduces the images) and kept apart from its noise stream.
            *args, **pipeline_kwargs: passed to the pipeline unchanged (prompt, guidance_scale, generator, ...).
        """
        stages = self._stages()
        for stage in stages:
            stage._check_usable()
        for per_image in (weights, kl_scale):
            _check_one_per_image(per_image, args, pipeline_kwargs)
        offloaded = bool(getattr(self.pipe, "_all_hooks", None))
        if offloaded and any(stage.denoiser.modules_by_name for stage in stages):
            raise ValueError(
                "model CPU offload with full-module members is not supported yet: use LoRA members, or call "
                "pipe.to(device) instead of enable_model_cpu_offload()"
            )
        if mode == "stochastic" and any(caches_conditions(self.pipe, stage.base, pipeline_kwargs) for stage in stages):
            raise ValueError(CONDITION_CACHES_IN_STOCHASTIC_MODE)
        if mode == "stochastic" and member_generator is None:
            member_generator = _member_generator(pipeline_kwargs.get("generator"), self._execution_device())
        for stage in stages:
            stage._follow_base()
            stage.denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=member_generator)
        with contextlib.ExitStack() as during_the_call:
            if offloaded:  # runs last, once every denoiser is back
                during_the_call.callback(self._offload_again, stages)
            for stage in stages:
                during_the_call.enter_context(stage._swapped())
                during_the_call.enter_context(stage.denoiser.routing())
                during_the_call.enter_context(_attention_processors_kept(stage.denoiser))
            during_the_call.enter_context(_guider_hooks_on_modules(self.pipe, stages))
            return self.pipe(*args, **pipeline_kwargs)

    __call__ = blend

    def unload(self) -> None:
        """Remove the basis LoRAs from the pipeline and drop the loaded full members; the Blend is done after."""
        for expert in self.experts:
            expert.unload()
        if self.lora_names:
            snapshot = ActivationSnapshot(self.base)
            self.base.delete_adapters(self.lora_names)
            snapshot.restore()
        self.lora_names = []
        self.owned.clear()
        self.denoiser = None

    # -------------------------------------------------------------------------------------------------------- loading
    def _stages(self) -> list[Blend]:
        """This denoiser's attachment and those of the pipeline's other denoisers blended alike."""
        return [self, *self.experts]

    def _execution_device(self) -> torch.device:
        """Where the pipeline computes (its denoiser's device, or the offload target)."""
        device = getattr(self.pipe, "_execution_device", None)
        return torch.device(device) if device is not None else self.base.device

    def _check_loaded(self) -> None:
        if self.denoiser is None:
            raise ValueError("this Blend was unloaded; make a new one")

    def _check_usable(self) -> None:
        self._check_loaded()
        if getattr(self.pipe, self.denoiser_name) is self.denoiser:
            raise ValueError(
                "this Blend is in the middle of a call (blend() from a callback of its own call?): one call at a time"
            )
        if getattr(self.pipe, self.denoiser_name) is not self.held:
            raise ValueError(
                f"pipe.{self.denoiser_name} was replaced after the Blend was made; make a new Blend for the new one"
            )

    def _resolve(self, name: str, source: BasisSource | None) -> LoraFile | nn.Module:
        """Read and check one basis source without touching the pipeline (None: this denoiser is the base's)."""
        if source is None:
            return self.base
        if isinstance(source, nn.Module):
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
        for prefix in dict.fromkeys((self.denoiser_name, _family(self.denoiser_name))):
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
        except (RuntimeError, ValueError, TypeError) as error:  # e.g. a LoRA made for another model size
            detail = str(error).strip().splitlines()
            raise ValueError(
                f"basis {name!r}: {lora.path} does not fit the pipeline's {self.denoiser_name} "
                f"({detail[-1] if detail else type(error).__name__})"
            ) from error

    # ------------------------------------------------------------------------------------------------------- calling
    def _follow_base(self) -> None:
        """Keep the full members this Blend loaded where the base is (e.g. after ``pipe.to``), tensor by tensor: a
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

    def _offload_again(self, stages: list[Blend]) -> None:
        """With model CPU offload the pipeline re-installs its offload hooks at the end of every call, on whatever
        its components then are, the wrappers included; they are taken off the wrappers and put back on the bases.
        (A base's own hook moves it to the GPU for every member evaluation meanwhile.)"""
        from accelerate.hooks import remove_hook_from_module

        for stage in stages:
            remove_hook_from_module(stage.denoiser)
        self.pipe.enable_model_cpu_offload(device=getattr(self.pipe, "_offload_device", None))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_basis_names(basis: Mapping[str, BasisSource]) -> None:
    if not isinstance(basis, Mapping) or not basis:
        raise ValueError("the basis is empty: give at least one name → LoRA path, denoiser folder or module")
    for name, source in basis.items():
        check_member_name(name)
        if all(part is None for part in (source.values() if isinstance(source, Mapping) else [source])):
            raise ValueError(
                f"basis {name!r} leaves every denoiser unchanged (no source, or None for each): give "
                "a LoRA, a denoiser folder or a module (None only beside another denoiser's source)"
            )


def _check_no_collision(pipe: Any, basis: Mapping[str, BasisSource], denoisers: Sequence[str]) -> None:
    present = set()
    for name in denoisers:
        if isinstance(getattr(pipe, name, None), nn.Module):
            present.update(loaded_adapters(getattr(pipe, name)))
    for component in getattr(pipe, "components", {}).values():
        present.update(getattr(component, "peft_config", {}) or {})
    clashing = sorted(set(basis) & present)
    if clashing:
        raise ValueError(
            f"basis name(s) {', '.join(map(repr, clashing))} collide with adapters already on the pipeline; "
            "choose other names or delete those adapters first"
        )


def _denoisers_to_blend(pipe: Any, basis: Mapping[str, BasisSource], denoiser: str | Sequence[str] | None) -> tuple:
    """The pipeline attributes to blend: as given, else those a basis given per denoiser names, else the one
    denoiser of the pipeline."""
    if isinstance(denoiser, str):
        return (denoiser,)
    if denoiser is not None:
        names = tuple(denoiser)
        if not names or len(set(names)) != len(names) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"denoiser must be an attribute name or distinct names, got {denoiser!r}")
        return names
    given = next((source for source in basis.values() if isinstance(source, Mapping)), None)
    return tuple(given) if given else (_find_denoiser_name(pipe),)


def _basis_per_denoiser(basis: Mapping[str, BasisSource], denoisers: tuple) -> dict[str, dict[str, BasisSource]]:
    """denoiser → {basis name → its source there}: a basis is one source (one denoiser blended) or a source per
    denoiser blended (Wan 2.2's experts: ``{"transformer": high, "transformer_2": low}``)."""
    per_denoiser: dict[str, dict[str, BasisSource]] = {name: {} for name in denoisers}
    for name, source in basis.items():
        if not isinstance(source, Mapping):
            if len(denoisers) > 1:
                raise ValueError(
                    f"basis {name!r}: blending {', '.join(denoisers)} needs a source for each, "
                    f"as {{{', '.join(repr(d) + ': ...' for d in denoisers)}}}"
                )
            source = {denoisers[0]: source}
        if set(source) != set(denoisers):
            raise ValueError(
                f"basis {name!r} gives sources for {', '.join(map(str, source)) or 'no denoiser'}, "
                f"but the blend is of {', '.join(denoisers)}: give one for each (None for a denoiser "
                "the basis leaves unchanged)"
            )
        for denoiser_name, part in source.items():
            per_denoiser[denoiser_name][name] = part
    return per_denoiser


def _find_denoiser_name(pipe: Any) -> str:
    """The pipeline attribute holding its denoiser: ``unet`` or ``transformer``, or a numbered one (``transformer_2``)
    where it is the only one loaded. Pipelines that switch between two denoisers during sampling (Wan 2.2's high-
    and low-noise experts, ``transformer`` and ``transformer_2``) must be told which one to blend."""
    names = [
        name for name in (getattr(pipe, "components", None) or DENOISER_FOLDERS) if _family(name) in DENOISER_FOLDERS
    ]
    present = [name for name in names if isinstance(getattr(pipe, name, None), nn.Module)]
    if len(present) > 1:
        raise ValueError(
            f"{type(pipe).__name__} switches between denoisers during sampling ({', '.join(present)}): give each "
            f"basis a source per denoiser ({{{', '.join(repr(d) + ': ...' for d in present)}}}) to blend them all, "
            f"or choose one with denoiser='{present[0]}' (CLI: --denoiser; the others' steps then run unblended)"
        )
    if not present:
        raise ValueError(
            f"cannot tell the denoiser of {type(pipe).__name__} (it has neither a unet nor a transformer); "
            "pass denoiser='<attribute name>'"
        )
    return present[0]


def _check_one_per_image(values: Any, args: tuple, pipeline_kwargs: dict) -> None:
    """Weights or λ given per sample are one per image of the call. Where the call's arguments do not tell how many
    images it makes, a list of several is refused: the denoiser's rows alone cannot tell images from the halves of
    classifier-free guidance (4 weights on 2 images × 2 halves would blend each image's halves apart)."""
    if isinstance(values, (Mapping, str)) or not isinstance(values, Sequence):
        return
    what = "weights" if values and isinstance(values[0], Mapping) else "kl_scale values"
    images = _images_of_call(args, pipeline_kwargs)
    if images is None and len(values) > 1:
        raise ValueError(
            f"{what} are given per image, but the call's arguments do not tell how many images it makes: "
            "pass prompt (or prompt_embeds / pooled_prompt_embeds with one row per prompt)"
        )
    if images is not None and images != len(values):
        raise ValueError(
            f"{what} are given for {len(values)} images, but the call makes {images} (prompts × images "
            "per prompt): give one per image, in the pipeline's order (each prompt's images together)"
        )


#: Pipeline arguments with one item per prompt where the prompt is not given (embeddings computed beforehand;
#: Z-Image's prompt_embeds are a list with one tensor per prompt, Kandinsky 2.2's image embeddings a tensor or a list
#: of tensors that the pipeline concatenates)
PROMPT_ROWS = ("prompt_embeds", "pooled_prompt_embeds", "image_embeds")


def _images_of_call(args: tuple, pipeline_kwargs: dict) -> int | None:
    """How many images (or videos) a pipeline call makes, where its arguments tell: prompts (or rows of prompt
    embeddings) × images per prompt."""
    prompts = _prompts_of_call(args, pipeline_kwargs)
    if prompts is None:
        return None
    per_prompt = next(
        (
            pipeline_kwargs[name]
            for name in ("num_images_per_prompt", "num_videos_per_prompt")
            if pipeline_kwargs.get(name) is not None
        ),
        1,
    )
    return prompts * per_prompt


def _prompts_of_call(args: tuple, pipeline_kwargs: dict) -> int | None:
    """How many prompts a pipeline call has: its prompt (a string or a list of them), else the rows of the first of
    :data:`PROMPT_ROWS` it is given."""
    prompt = pipeline_kwargs.get("prompt", args[0] if args else None)
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        return len(prompt)
    for name in PROMPT_ROWS:
        value = pipeline_kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return len(value)
        if isinstance(value, list) and value and all(isinstance(item, torch.Tensor) for item in value):
            return len(value) if name == "prompt_embeds" else sum(len(item) for item in value)
    return None


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


def _family(denoiser_name: str) -> str:
    """``transformer`` for ``transformer_2``: the name its LoRA keys and folders carry in a one-denoiser pipeline."""
    return re.sub(r"_\d+$", "", denoiser_name)


@contextlib.contextmanager
def _guider_hooks_on_modules(pipe: Any, stages: list[Blend]) -> Iterator[None]:
    """Guiders that hook the denoiser's blocks for their extra batch (diffusers' skip-layer, perturbed-attention and
    smoothed-energy guiders: modular pipelines, HunyuanVideo 1.5) look the blocks up by name in the module they are
    given, and the blended denoiser's are its base's and its full members'. For the call, such a guider given the
    blended denoiser hooks its base (the LoRA members' rows run there) and each full member gets copies of the hooks
    on its blocks of the same names; the guider's cleanup, given the blended denoiser, removes them from all."""
    guider = getattr(pipe, "guider", None)
    prepare = getattr(guider, "prepare_models", None)
    if prepare is None:
        yield
        return
    blended = {id(stage.denoiser): stage.denoiser for stage in stages}

    def prepare_models(denoiser: Any) -> None:
        wrapper = blended.get(id(denoiser))
        if wrapper is None:
            return prepare(denoiser)
        if not wrapper.modules_by_name:  # (LoRA members only: the base is all there is to hook, no module walk)
            return prepare(wrapper.base)
        before = _diffusers_hooks(wrapper.base)
        prepare(wrapper.base)
        added = {
            (name, hook_name): hook
            for (name, hook_name), hook in _diffusers_hooks(wrapper.base).items()
            if (name, hook_name) not in before
        }
        for member in wrapper.modules_by_name.values():
            for (name, hook_name), hook in added.items():
                HookRegistry.check_if_exists_or_initialize(member.get_submodule(name)).register_hook(
                    copy.copy(hook), hook_name
                )

    own = vars(guider).get("prepare_models")
    guider.prepare_models = prepare_models
    try:
        yield
    finally:
        if own is None:
            del guider.prepare_models  # the class's method again
        else:
            guider.prepare_models = own


def _diffusers_hooks(module: nn.Module) -> dict[tuple[str, str], Any]:
    """(submodule name, hook name) → hook, for the diffusers hooks on ``module`` and its submodules."""
    return {
        (name, hook_name): hook
        for name, submodule in module.named_modules()
        for hook_name, hook in getattr(getattr(submodule, "_diffusers_hook", None), "hooks", {}).items()
    }


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


def _member_generator(pipeline_generator: Any, device: torch.device) -> torch.Generator:
    """A generator for the stochastic draws, seeded from the current state of the pipeline's generator (where none is
    given, of torch's global generators: the CPU's and that of the device, whose diffusers then draws its noise
    from) without consuming from it: the same seed gives the same draws, a generator reused for the next call gives
    new ones, and the noise stays the pipeline's."""
    first = pipeline_generator[0] if isinstance(pipeline_generator, (list, tuple)) else pipeline_generator
    if isinstance(first, torch.Generator):
        states = [first.get_state()]
    else:
        states = [torch.get_rng_state(), *_device_rng_state(device)]
    digest = hashlib.blake2b(
        b"".join(state.numpy().tobytes() for state in states), digest_size=8, person=b"db-members"
    ).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def _device_rng_state(device: torch.device) -> list[torch.Tensor]:
    """The state of torch's default generator of an accelerator (none for the CPU)."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        return [torch.cuda.get_rng_state(device)]
    if device.type == "mps":
        return [torch.mps.get_rng_state()]
    return []
