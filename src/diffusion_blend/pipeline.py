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
import inspect
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from torch import nn

from .adapters import loaded_adapters
from .caches import CONDITION_CACHES_IN_STOCHASTIC_MODE, caches_conditions
from .checks import check_member_name
from .denoiser import BlendedDenoiser
from .loading import DENOISER_FOLDERS, check_base_folder, resolve_source
from .smc.particles import SMC, Trace
from .stage import BasisSource, Stage, family
from .turns import taking_turns


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

    Outside :meth:`blend` the pipeline samples as the plain pipeline: the basis LoRAs are loaded but inactive, and the
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
        self.pipe = pipe
        #: one per denoiser blended, in the order given (Wan 2.2: the high-noise expert, then the low-noise one)
        self.stages: list[Stage] = []
        self._last = threading.local()  # per thread: what its last corrected call did
        with taking_turns([pipe]):  # (adapters loaded while another thread samples would change its images)
            try:
                for name in names:
                    self.stages.append(Stage(pipe, name, per_denoiser[name], evaluation))
            except Exception:
                for stage in self.stages:
                    stage.unload()
                raise

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
        check_base_folder(model_id_or_path)
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
        return list(self._first_usable().denoiser.names)

    @property
    def denoiser_names(self) -> list[str]:
        """The pipeline attributes blended: its denoiser, or each of its denoisers given a basis (Wan 2.2's experts)."""
        return [stage.denoiser_name for stage in self.stages]

    @property
    def denoiser(self) -> BlendedDenoiser:
        """The first stage's blended denoiser (the only one, unless a pipeline switches denoisers)."""
        return self._first_usable().denoiser

    @property
    def base(self) -> nn.Module:
        """The first stage's base denoiser."""
        return self.stages[0].base

    @property
    def denoiser_name(self) -> str:
        return self.stages[0].denoiser_name

    @property
    def lora_names(self) -> list[str]:
        """The basis LoRAs loaded on the first stage's denoiser."""
        return self.stages[0].lora_names

    @property
    def owned(self) -> dict[str, nn.Module]:
        """The full members the first stage loaded from paths."""
        return self.stages[0].owned

    @property
    def experts(self) -> list[Stage]:
        """The stages after the first (Wan 2.2's low-noise expert)."""
        return self.stages[1:]

    @property
    def smc_trace(self) -> Trace | None:
        """What this thread's last call corrected by SMC did (ESS per step, resamplings, calls); None before one."""
        return getattr(self._last, "trace", None)

    @property
    def has_lora_members(self) -> bool:
        """Whether any basis is a LoRA on any of the denoisers blended."""
        return any(stage.lora_names for stage in self.stages)

    def to(self, *args: Any, **kwargs: Any) -> Blend:
        """Move the pipeline (and the full-module members loaded from paths) like ``pipe.to``."""
        self.pipe.to(*args, **kwargs)
        for stage in self.stages:
            stage.follow_base()
        return self

    def blend(
        self,
        *args: Any,
        weights: Mapping[str, float] | Sequence[Mapping[str, float]],
        kl_scale: float | Sequence[float] = 1.0,
        mode: str = "mix",
        member_generator: torch.Generator | None = None,
        corrector: SMC | None = None,
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
            corrector: :class:`~diffusion_blend.smc.SMC` with rewards and α: sequential Monte Carlo towards the exact
                target p_base · exp(λ Σ w_i r_i / α), K particles per image as rows of the call, the blend as proposal
                (:mod:`diffusion_blend.smc.pipeline`; mode ``"mix"``, a DDPM or DDIM η > 0 scheduler). The run's
                trace (ESS per step, resamplings, calls) is kept in :attr:`smc_trace`.
            *args, **pipeline_kwargs: passed to the pipeline unchanged (prompt, guidance_scale, generator, ...).

        Calls on the same denoiser take turns (:mod:`diffusion_blend.turns`): from several threads, each waits for
        the one before it and gets its own result.
        """
        with taking_turns([self.pipe, *(stage.base for stage in self.stages)]):
            return self._blend_call(args, weights, kl_scale, mode, member_generator, corrector, pipeline_kwargs)

    __call__ = blend

    def _blend_call(self, args, weights, kl_scale, mode, member_generator, corrector, pipeline_kwargs) -> Any:
        stages = self.stages
        _check_pipeline_arguments(self.pipe, pipeline_kwargs)
        for stage in stages:
            stage.check_usable()
        for what, per_image in (("weights", weights), ("kl_scale values", kl_scale)):
            _check_one_per_image(what, per_image, args, pipeline_kwargs)
        correction = None
        if corrector is not None:
            correction = self._correction(corrector, weights, kl_scale, mode, args, pipeline_kwargs)
            weights, kl_scale, pipeline_kwargs = correction.weights, correction.kl_scale, correction.pipeline_kwargs
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
            stage.follow_base()
            stage.denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=member_generator)
        with contextlib.ExitStack() as during_the_call:
            if offloaded:  # runs last, once every denoiser is back
                during_the_call.callback(self._offload_again)
            for stage in stages:
                during_the_call.enter_context(stage.in_the_call())
            during_the_call.enter_context(_guider_hooks_on_modules(self.pipe, stages))
            if correction is None:
                return self.pipe(*args, **pipeline_kwargs)
            during_the_call.enter_context(correction.installed(stages[0].denoiser))
            output = self.pipe(*args, **pipeline_kwargs)
        self._last.trace = correction.trace
        return correction.selected(output)

    def unload(self) -> None:
        """Remove the basis LoRAs from the pipeline and drop the loaded full members; the Blend is done after."""
        with taking_turns([self.pipe]):
            for stage in self.stages:
                stage.unload()

    def _correction(self, corrector: SMC, weights, kl_scale, mode: str, args: tuple, pipeline_kwargs: dict):
        from .smc.pipeline import PipelineCorrection

        if not isinstance(corrector, SMC):
            raise ValueError(f"corrector must be an SMC(...), got {type(corrector).__name__}")
        if mode != "mix":
            raise ValueError("the SMC corrector weighs the blend's Gaussian step: use mode='mix'")
        if len(self.stages) > 1:
            raise ValueError("the SMC corrector follows one blended denoiser; this blend switches between several")
        images = _images_of_call(args, pipeline_kwargs)
        return PipelineCorrection(self.pipe, corrector, weights, kl_scale, images, self.names, args, pipeline_kwargs)

    def _first_usable(self) -> Stage:
        self.stages[0].check_loaded()
        return self.stages[0]

    def _execution_device(self) -> torch.device:
        """Where the pipeline computes (its denoiser's device, or the offload target)."""
        device = getattr(self.pipe, "_execution_device", None)
        return torch.device(device) if device is not None else self.base.device

    def _offload_again(self) -> None:
        """With model CPU offload the pipeline re-installs its offload hooks at the end of every call, on whatever
        its components then are, the wrappers included; they are taken off the wrappers and put back on the bases.
        (A base's own hook moves it to the GPU for every member evaluation meanwhile.)"""
        from accelerate.hooks import remove_hook_from_module

        for stage in self.stages:
            remove_hook_from_module(stage.denoiser)
        self.pipe.enable_model_cpu_offload(device=getattr(self.pipe, "_offload_device", None))


def _check_basis_names(basis: Mapping[str, BasisSource]) -> None:
    if not isinstance(basis, Mapping):
        raise ValueError(
            f"basis must be a mapping of name → LoRA path, denoiser folder or module (the names are what weights "
            f"refer to), got a {type(basis).__name__}"
        )
    if not basis:
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
        name for name in (getattr(pipe, "components", None) or DENOISER_FOLDERS) if family(name) in DENOISER_FOLDERS
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


#: what diffusers pipelines still read from their ``**kwargs`` (deprecated callbacks)
DEPRECATED_CALL_ARGUMENTS = ("callback", "callback_steps")


def _check_pipeline_arguments(pipe: Any, pipeline_kwargs: dict) -> None:
    """Arguments a diffusers pipeline would silently ignore (its ``**kwargs`` takes anything), counts and sizes below
    one (a pipeline would decode its starting noise, or fail deep inside) and non-finite numbers are refused by name.
    (A modular pipeline's ``**kwargs`` are its inputs.)"""
    from diffusers import DiffusionPipeline

    parameters = inspect.signature(pipe.__call__).parameters
    takes_anything = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    if isinstance(pipe, DiffusionPipeline) and takes_anything:
        unknown = sorted(set(pipeline_kwargs) - set(parameters) - set(DEPRECATED_CALL_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"{type(pipe).__name__} takes no argument(s) {', '.join(unknown)} (it would ignore them); "
                "Blend.blend's own are weights, kl_scale, mode, member_generator and corrector"
            )
    for name in ("num_inference_steps", "height", "width", "num_frames"):
        count = pipeline_kwargs.get(name)
        if isinstance(count, int) and not isinstance(count, bool) and count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}")
    for name, value in pipeline_kwargs.items():  # (a NaN guidance scale would make NaN images, silently)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} is {value}: the pipeline's numeric arguments must be finite")


def _check_one_per_image(what: str, values: Any, args: tuple, pipeline_kwargs: dict) -> None:
    """Weights or λ given per sample are one per image of the call. Where the call's arguments do not tell how many
    images it makes, a list of several is refused: the denoiser's rows alone cannot tell images from the halves of
    classifier-free guidance (4 weights on 2 images × 2 halves would blend each image's halves apart)."""
    if isinstance(values, (Mapping, str)) or not isinstance(values, Sequence):
        return
    if not values:
        raise ValueError(f"{what} are an empty list: give one value for every image, or one for all")
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


@contextlib.contextmanager
def _guider_hooks_on_modules(pipe: Any, stages: list[Stage]) -> Iterator[None]:
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
