"""BlendedDenoiser: a stand-in for a pipeline's denoiser (UNet or transformer) that returns the blended prediction.

Like k-diffusion's model wrappers, it is called exactly as the wrapped module is called and returns the same type,
so any sampling loop (a diffusers pipeline, a hand-written loop, the lab's exact samplers) runs Diffusion Blend
without knowing it. Members are full fine-tuned modules of the base's architecture, or names of peft LoRA
adapters loaded on the base (evaluated on the shared base through :class:`~diffusion_blend.adapters.AdapterRouter`).

Every forward call is planned as a list of *evaluations* — (member, rows of the batch) — and then executed; the
plan decides what the formula needs (the base only where its coefficient is non-zero, members only where their
weight is), the executor decides how many denoiser calls that takes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from diffusers import ModelMixin
from diffusers.utils.torch_utils import is_compiled_module, unwrap_module
from torch import nn
from torch.func import functional_call

from .adapters import NO_ADAPTER, AdapterRouter, RowsReshaped, loaded_adapters, weights_placed_on_call
from .blend import base_coefficient, blend_per_row, blend_predictions, validate_kl_scale, validate_weights
from .caches import (
    CONDITION_CACHES_IN_STOCHASTIC_MODE,
    ConditionCaches,
    StepCacheContexts,
    reads_condition_cache,
    uses_step_cache,
)

#: The base's name in an evaluation plan (peft's own name for "no adapter", so it can never be a member's name).
BASE = NO_ADAPTER
MODES = ("mix", "stochastic")
#: ``max_batch_size`` that caps a call at the rows the denoiser was called with (a single model's call)
INPUT_ROWS = "input"
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
#: FreeU's factors, kept on each up block of a UNet (``enable_freeu``).
FREEU_FACTORS = ("s1", "s2", "b1", "b2")
#: Names of a denoiser's timestep argument (the stochastic draws are kept across calls at one timestep).
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
#: The arguments in which diffusers' denoisers take the LoRA scale, as ``{"scale": s}`` (their ``apply_lora_scale``).
LORA_SCALE_ARGUMENTS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
#: A denoiser's sample or prediction: one tensor with the batch's rows first or, for denoisers of per-sample sizes
#: (Z-Image), a list with one tensor per sample; the blend is the same equation, sample by sample.
Rows = torch.Tensor | list[torch.Tensor]


class Fields(tuple):
    """The predictions of a denoiser with several outputs (LTX-2's video and audio), in the order of its output's
    fields: each field is blended, stacked and split as a prediction of its own."""


#: What a denoiser call predicts: its prediction, or one per prediction field of a several-output denoiser
Prediction = Rows | Fields


class Evaluation(NamedTuple):
    """One member (or ``BASE``) to evaluate on some rows of the batch (``None``: all rows)."""

    member: str
    rows: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class BlendSettings:
    #: basis name → w_i: one mapping for every sample, or one per sample of the batch (a sweep in one batch)
    weights: tuple[dict[str, float], ...]
    #: λ: one for every sample, or one per sample
    kl_scales: tuple[float, ...]
    mode: str
    generator: torch.Generator | None

    @property
    def samples(self) -> list[tuple[dict[str, float], float]]:
        """(weights, λ) per sample: one pair where every sample shares them."""
        count = max(len(self.weights), len(self.kl_scales))
        return [
            (self.weights[index % len(self.weights)], self.kl_scales[index % len(self.kl_scales)])
            for index in range(count)
        ]

    @property
    def kl_scale(self) -> float | None:
        """λ where every sample shares it, else None."""
        return self.kl_scales[0] if len(self.kl_scales) == 1 else None


class BlendedDenoiser(nn.Module):
    """Wraps a denoiser and its basis members; ``forward`` returns ``base + λ Σ w_i (member_i − base)``.

    Args:
        base: the pretrained denoiser module (e.g. a ``UNet2DConditionModel`` or ``SD3Transformer2DModel``).
        members: basis name → a full fine-tuned denoiser of the same architecture, the name of a peft LoRA
            adapter already loaded on ``base``, or ``base`` itself (a basis that leaves this denoiser unchanged: its
            prediction is the base's, at no extra call).
        batch_members: evaluate the base and all LoRA members in one call on the shared base (their rows stacked
            in the batch, each row routed to its adapter) instead of one call each: the same FLOPs in one call, so
            a call's fixed cost is paid once (docs/performance.md). ``False``: one call per member.
        max_batch_size: at most this many rows per denoiser call (chunks bound the memory of stacked calls; vmapped
            full members count their rows each), or ``"input"``: at most the rows the denoiser is called with, so
            that a blend's peak memory is a single model's (docs/performance.md).
        vmap_full_members: evaluate the full-module members needed on all rows in one ``torch.vmap`` call over
            their stacked weights (as ``torch.func.stack_module_state`` stacks them) instead of one call each. It
            keeps a stacked copy of their weights; no faster on CPUs (measured), meant for GPUs at small batch sizes.
            Members that carry hooks are refused (a vmapped call runs a weightless copy, not the member), and so,
            at their first call, are denoisers with an operation ``torch.vmap`` cannot batch (Z-Image's).
        compile: ``torch.compile`` the denoiser calls of the blend: ``True`` (torch's defaults), a dict of
            ``torch.compile`` options (``{"mode": "max-autotune", "fullgraph": True}``), ``False``, or ``None`` (the
            default: compile when the base or a member was given compiled, whole or by regions, with torch's
            default options). LoRA rows are then routed by a mask tensor, so a graph is reused for every weight
            mix, λ and stochastic draw that stacks as many rows (the plan sets the rows: the base drops out when
            λΣw = 1, members of weight 0 are skipped); modules given compiled (``torch.compile(unet)``) are
            unwrapped and called through the blend's own compiled calls. Combines with ``vmap_full_members``.

    Call :meth:`set_blend` before the first forward call. The wrapper exposes the base's ``config``, ``dtype``,
    ``device`` and every other attribute, so a pipeline cannot tell it from the base.
    """

    def __init__(
        self,
        base: nn.Module,
        members: Mapping[str, nn.Module | str],
        *,
        batch_members: bool = True,
        max_batch_size: int | str | None = None,
        vmap_full_members: bool = False,
        compile: bool | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(members, Mapping) or not members:
            raise ValueError("a blend needs at least one basis member (members is empty)")
        for name in members:
            check_member_name(name)
        if max_batch_size not in (None, INPUT_ROWS) and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(
                f"max_batch_size must be a positive integer, {INPUT_ROWS!r} or None, got {max_batch_size!r}"
            )
        given_compiled = any(was_compiled(module) for module in (base, *members.values()))
        self.compile_options = compile_options(compile, given_compiled)
        self.vmap_full_members = vmap_full_members
        self.batch_members = batch_members
        self.max_batch_size = max_batch_size
        base = unwrap_module(base)
        members = {name: unwrap_module(member) for name, member in members.items()}
        self.base = base
        #: members given as the base module itself (a basis that leaves this denoiser unchanged: one Wan 2.2 expert
        #: fine-tuned, the other not): the base's prediction, evaluated with the base
        self.same_as_base = {name for name, member in members.items() if member is base}
        self.modules_by_name = nn.ModuleDict(
            {
                name: member
                for name, member in members.items()
                if isinstance(member, nn.Module) and name not in self.same_as_base
            }
        )
        self.adapter_of = {name: member for name, member in members.items() if isinstance(member, str)}
        odd = [name for name, member in members.items() if not isinstance(member, (nn.Module, str))]
        if odd:
            raise ValueError(f"member(s) {odd} must be an nn.Module or the name of a LoRA adapter on the base")
        self.names = list(members)
        self._check_adapters_loaded()
        for name, module in self.modules_by_name.items():
            _check_same_architecture(name, base, module)
        _check_prediction_types(base, self.modules_by_name)
        self.router = AdapterRouter(base, list(self.adapter_of.values())) if self.adapter_of else None
        self._compiled_functions: dict[str, Any] = {}
        self._latent_name, self._timestep_parameter = _sample_and_timestep_parameters(base)
        signature = inspect.signature(base.forward)
        self._parameter_names = list(signature.parameters)
        self._lora_scale_parameter = lora_scale_parameter(signature.parameters)
        self._attention_layers = {
            name: _attention_layers(module) for name, module in {BASE: base, **self.modules_by_name}.items()
        }
        self.settings: BlendSettings | None = None
        self._draws: _DrawCache | None = None
        self._draw_probabilities: torch.Tensor | None = None
        self._vmap_cache: dict[tuple[str, ...], tuple] = {}  # vmapped group → (weights' versions, stacked state)
        self._rows_reshaped = False  # the base reshapes its batch inside: LoRA members cannot share its calls
        self._caches = (
            ConditionCaches()
        )  # each denoiser call's own condition keys and values, where a pipeline caches them
        self._step_contexts = StepCacheContexts()  # each denoiser call's own context for diffusers' step caches
        self._row_tables: dict[
            tuple, torch.Tensor
        ] = {}  # per-sample λ·w (or λ) as (rows, columns) tables, per call shape
        self.forward = SignedForward(self, signature)

    # ---------------------------------------------------------------------------------------------- what pipelines read
    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return _placement(self.base)[1]

    @property
    def device(self) -> torch.device:
        return _placement(self.base)[0]

    def set_attn_processor(self, processor: Any) -> None:
        """Set the attention processors of the base and of every full member (diffusers' ``set_attn_processor``:
        one processor, or one per layer name, the base's names). Pipelines that install processors for their call
        (perturbed-attention guidance) put them on every attention layer of the wrapper, members' included, and
        restore them through this method: on the base alone, the members would keep the call's processors."""
        for module in self._base_and_full_members():
            module.set_attn_processor(dict(processor) if isinstance(processor, Mapping) else processor)  # (it pops)

    def _base_and_full_members(self) -> tuple[nn.Module, ...]:
        """The base and every full member: the modules a setting of the wrapper's applies to."""
        return (self.base, *self.modules_by_name.values())

    def cache_context(self, name: str, **kwargs: Any) -> contextlib.AbstractContextManager:
        """diffusers' ``cache_context``: the context a pipeline names for its denoiser call (``"cond"``,
        ``"uncond"``) for the step caches of the base and of the members (``enable_cache``). Each denoiser call of the
        blend runs in a context of its own within it (:class:`~diffusion_blend.caches.StepCacheContexts`)."""
        return self._step_contexts.given(name, **kwargs)

    def enable_cache(self, config: Any) -> None:
        """diffusers' ``enable_cache`` (First Block Cache, TaylorSeer, MagCache, ...) on the base and on every full
        member: each module keeps its own cache state. LoRA members are cached with the base they share."""
        for module in self._base_and_full_members():
            module.enable_cache(config)

    def disable_cache(self) -> None:
        """diffusers' ``disable_cache`` on the base and on every full member that has a cache enabled."""
        for module in self._base_and_full_members():
            if uses_step_cache(module):
                module.disable_cache()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Forget what the step caches of the base and of the members computed (diffusers' pipelines call it at the
        end of their call, so that the next call starts afresh)."""
        for module in self._base_and_full_members():
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

    # ------------------------------------------------------------------------------------------------------- the blend
    def set_blend(
        self,
        weights: Mapping[str, float] | Sequence[Mapping[str, float]],
        kl_scale: float | Sequence[float] = 1.0,
        mode: str = "mix",
        generator: torch.Generator | None = None,
    ) -> None:
        """Choose the blend used by every following forward call.

        Args:
            weights: basis name → w_i; names left out count as 0. In ``"stochastic"`` mode they must lie on the
                simplex. A sequence of such mappings gives each sample of the batch its own (a sweep over weights
                in one batch): the denoiser's rows are then that many samples, repeated (classifier-free
                guidance's halves), and sample s's rows are s, s + S, s + 2S, ...
            kl_scale: λ ≥ 0, the KL-strength multiplier (DB-KLA): λ > 1 regularises less, λ < 1 stays nearer the base;
                or one per sample, as weights may be (a sweep over λ; with weights per sample, as many).
            mode: ``"mix"`` evaluates every member with non-zero weight and combines them; ``"stochastic"``
                (DB-MPA-LS) lets each sample draw one member I with probability w_I at every denoising step and
                returns ``base + λ (member_I − base)``: the same expectation at the cost of one member (plus the
                base where λ ∉ {0, 1}).
            generator: the random generator of the stochastic draws (reproducible for a fixed seed).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        checked = tuple(
            validate_weights(sample_weights, self.names, simplex=mode == "stochastic")
            for sample_weights in _weights_per_sample(weights)
        )
        for name, module in self.modules_by_name.items():  # again: the base may have changed (an IP-Adapter loaded)
            _check_same_architecture(name, self.base, module)
            _check_same_settings(name, self.base, module, self._attention_layers[BASE], self._attention_layers[name])
        self._check_placement()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if mode == "stochastic":
            self._refuse_step_caches()
        self.settings = BlendSettings(checked, _kl_scales_per_sample(kl_scale, len(checked)), mode, generator)
        self._draws = None
        self._draw_probabilities = self._probabilities() if mode == "stochastic" else None
        self._caches.clear()
        self._row_tables = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Called exactly like the base denoiser (each instance reports the base's signature); returns the blend."""
        return self._blend(*args, **kwargs)

    def _blend(self, *args: Any, **kwargs: Any) -> Any:
        if self.settings is None:
            raise RuntimeError("call set_blend(weights, ...) before using the BlendedDenoiser")
        latent = args[0] if args else kwargs[self._latent_name]
        try:  # (whatever fails, the call's condition caches are let go)
            self._begin_caches(kwargs)
            self._check_attention_alike()
            if self.settings.mode == "mix":
                blend = self._mix
            else:  # drawn once per call: a call redone below must not draw again (the seed's later draws would shift)
                drawn = (
                    self.draw_members(latent, self._timestep(args, kwargs)) if any(self.settings.kl_scales) else None
                )
                blend = functools.partial(self._stochastic, drawn=drawn)
            with self.routing(), self._lora_scaled(kwargs):
                try:
                    result = blend(latent, args, kwargs)
                except RowsReshaped:
                    if not self._members_share_calls():
                        raise
                    self._rows_reshaped = True  # found at the first call: from now on, one call per member
                    result = blend(latent, args, kwargs)
        except BaseException:
            self._caches.reset()
            raise
        self._caches.end(result)
        return result

    def _begin_caches(self, kwargs: dict) -> None:
        """Condition caches and step caches (:mod:`~diffusion_blend.caches`) are kept per denoiser call, which needs
        the same calls, on the same members' rows, at every step: a mix blend's. Refused where that does not hold, or
        where a cache is not of a protocol the blend knows."""
        if kwargs.get("kv_caches") is not None:
            raise ValueError(
                "the denoiser is called with kv_caches (GLM-Image's image-to-image): a key/value cache of "
                "a condition image is one model's, and a blend has one per member; it cannot be blended yet"
            )
        self._caches.begin(kwargs)
        if self._caches.active and self.settings.mode == "stochastic":
            raise ValueError(CONDITION_CACHES_IN_STOCHASTIC_MODE)
        if self._caches.active and self.compile_options is not None:
            raise ValueError("condition caches (kv_cache_mode) are not blended compiled yet: use compile=False")
        if self.settings.mode == "stochastic":  # (again: a cache may have been enabled since set_blend)
            self._refuse_step_caches()

    def _refuse_step_caches(self) -> None:
        """The stochastic mode draws another member for a sample at every step: a step cache would reuse at a step
        what another member computed at an earlier one."""
        named = {"the base": self.base} | {f"member {name!r}": module for name, module in self.modules_by_name.items()}
        cached = [name for name, module in named.items() if uses_step_cache(module)]
        if cached:
            raise ValueError(
                f"{', '.join(cached)} {'has' if len(cached) == 1 else 'have'} a step cache enabled "
                "(enable_cache), which reuses at a step what a call computed at earlier steps, and the "
                "stochastic mode draws another member for a sample at every step (a member would reuse "
                "another's results): use mode='mix', or disable_cache() for the stochastic mode"
            )

    def routing(self) -> contextlib.AbstractContextManager:
        """Keep the LoRA routing installed across many forward calls (e.g. a whole pipeline call): what each layer
        needs is then worked out once (see :class:`~diffusion_blend.adapters.AdapterRouter`)."""
        return self.router if self.router is not None else contextlib.nullcontext()

    def _lora_scaled(self, kwargs: dict) -> contextlib.AbstractContextManager:
        """The call's LoRA scale applied to the LoRA members: each member's update times ``s``, as diffusers applies
        ``cross_attention_kwargs={"scale": s}`` to an active adapter (members are routed, never active). Full
        members and the base receive the argument unchanged and apply it to their own active adapters, if any."""
        scale = lora_scale_of(self._lora_scale_parameter, kwargs)
        return self.router.scaled(scale) if self.router is not None and scale != 1 else contextlib.nullcontext()

    def plan_mix(self) -> list[Evaluation]:
        """What the mix formula needs: members with λ·w ≠ 0 (for some sample), and the base unless 1 − λΣw = 0 (for
        every sample; a member that is the base adds nothing to the sum: w (base − base))."""
        per_sample = [
            ({name: w for name, w in weights.items() if name not in self.same_as_base}, kl_scale)
            for weights, kl_scale in self.settings.samples
        ]
        members = [
            Evaluation(name)
            for name in per_sample[0][0]
            if any(kl_scale * weights[name] != 0 for weights, kl_scale in per_sample)
        ]
        needs_base = any(base_coefficient(weights.values(), kl_scale) != 0 for weights, kl_scale in per_sample)
        return ([Evaluation(BASE)] if needs_base else []) + members

    def _mix(self, latent: Rows, args: tuple, kwargs: dict) -> Any:
        plan = self.plan_mix()
        predictions, template = self.evaluate(plan, latent, args, kwargs)
        by_member = dict(zip((evaluation.member for evaluation in plan), predictions))
        members = [name for name in by_member if name != BASE]
        base, member_predictions = by_member.get(BASE), [by_member[name] for name in members]
        if len(self.settings.samples) == 1:
            weights = [self.settings.weights[0][name] for name in members]
            blended = blend_rows(base, member_predictions, weights, self.settings.kl_scale)
        else:  # λ·w per row, so that λ too may differ from sample to sample
            blended = blend_rows(base, member_predictions, self._per_row_table(tuple(members), latent), 1.0)
        return with_prediction(template, blended)

    def _per_row_table(self, members: tuple[str, ...] | None, latent: Rows) -> torch.Tensor:
        """Per sample λ·w of ``members`` (or λ alone: None) as a (rows, columns) table for a call on ``latent``, row
        r taking sample r mod S's (the rows are the S samples repeated); made on the host once per call shape (the
        same every step of a pipeline call) and copied without waiting (on a GPU a blocking copy would)."""
        like = _like(latent)
        key = (members, len(latent), like.device)
        if key not in self._row_tables:
            table = [
                [kl_scale * weights[name] for name in members] if members is not None else [kl_scale]
                for weights, kl_scale in self.settings.samples
            ]
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32  # (no float64 on every device)
            host = _per_row(torch.tensor(table, dtype=torch.float64), len(latent)).to(dtype)
            self._row_tables[key] = (host.pin_memory() if like.device.type == "cuda" else host).to(
                like.device, non_blocking=True
            )
        return self._row_tables[key]

    def _towards_drawn(self, base: Prediction | None, drawn: Prediction, latent: Rows) -> Prediction:
        """DB-MPA-LS's ``base + λ (member_I − base)`` with the drawn members' predictions (λ per sample or shared)."""
        if self.settings.kl_scale is not None:
            return blend_rows(base, [drawn], [1.0], self.settings.kl_scale)
        return blend_rows(base, [drawn], self._per_row_table(None, latent), 1.0)

    def _stochastic(self, latent: Rows, args: tuple, kwargs: dict, drawn: torch.Tensor | None) -> Any:
        """DB-MPA-LS with the call's draws (one member index per row; None where λ = 0)."""
        kl_scales = self.settings.kl_scales
        if not any(kl_scales):  # the blend is the base, whichever member is drawn
            predictions, template = self.evaluate([Evaluation(BASE)], latent, args, kwargs)
            return with_prediction(template, predictions[0])
        if self.router is not None and not self.modules_by_name and self._members_share_calls():
            return self._stochastic_routed(drawn, latent, args, kwargs)
        plan = [Evaluation(name, rows) for name, rows in _rows_by_member(drawn, self.names, _like(latent).device)]
        if any(kl_scale != 1 for kl_scale in kl_scales):
            plan.insert(0, Evaluation(BASE))
        predictions, template = self.evaluate(plan, latent, args, kwargs)
        drawn_prediction = _placed_rows(
            len(latent),
            [
                (evaluation.rows, prediction)
                for evaluation, prediction in zip(plan, predictions)
                if evaluation.rows is not None
            ],
        )
        base = predictions[0] if plan[0].member == BASE else None
        return with_prediction(template, self._towards_drawn(base, drawn_prediction, latent))

    def _stochastic_routed(self, drawn: torch.Tensor, latent: Rows, args: tuple, kwargs: dict) -> Any:
        """LoRA members only: every row goes through its drawn adapter in one call on the shared base (after the
        base's own rows where λ ≠ 1), routed by a mask built on the latents' device from the draws. Nothing is read
        back to the host, so a GPU is never made to wait (row lists per member would need that)."""
        mask = self.router.member_mask([self.adapter_of.get(name) for name in self.names], drawn, like=_like(latent))
        plan = [Evaluation(self.names[0])]  # its rows are routed by the mask: each to its drawn adapter
        if all(kl_scale == 1 for kl_scale in self.settings.kl_scales):  # the drawn members' predictions are the blend
            predictions, template = self._run_stacked(plan, latent, args, kwargs, mask=mask)
            return with_prediction(template, predictions[-1])
        plan.insert(0, Evaluation(BASE))
        mask = torch.cat([torch.zeros_like(mask), mask])
        predictions, template = self._run_stacked(plan, latent, args, kwargs, mask=mask)
        return with_prediction(template, self._towards_drawn(predictions[0], predictions[-1], latent))

    def draw_members(self, latent: Rows, timestep: Any = None) -> torch.Tensor:
        """DB-MPA-LS: one member index per row, drawn with probability w per *sample and denoising step*, as a
        tensor on the latents' device.

        A sample is recognised by its latent input: rows with bitwise identical latents are one sample presented
        several times and share their draw — within a call (classifier-free guidance's unconditional and
        conditional halves batched together) and with the previous call when it was at the same timestep
        (pipelines that run the two halves as two calls). Inputs that differ per branch (InstructPix2Pix's
        image-conditioning channels) and the several evaluations of one step by Heun-type solvers draw separately.
        """
        if self._draw_probabilities is None:
            raise RuntimeError("draw_members needs set_blend(..., mode='stochastic') first")
        if self._draws is None:
            self._draws = _DrawCache()
        return self._draws.draw(
            latent, timestep, self._draw_probabilities, self.settings.generator, samples=len(self.settings.samples)
        )

    def _probabilities(self) -> torch.Tensor:
        """w as a tensor on the generator's device, made once per :meth:`set_blend` (on a GPU, making it waits): one
        row per sample for per-sample weights, else a vector."""
        generator = self.settings.generator
        device = generator.device if generator is not None else torch.device("cpu")
        table = torch.tensor(
            [[weights[name] for name in self.names] for weights in self.settings.weights],
            dtype=torch.float64,
            device=device,
        )
        return table[0] if len(table) == 1 else table

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if self._timestep_parameter is None:
            return None
        name, position = self._timestep_parameter
        return args[position] if len(args) > position else kwargs.get(name)

    # ----------------------------------------------------------------------------------------------------- execution
    def evaluate(self, plan: list[Evaluation], latent: Rows, args: tuple, kwargs: dict) -> tuple[list[Prediction], Any]:
        """Run the plan in as few denoiser calls as the members allow.

        Returns the predictions in plan order, and one raw output of the denoiser as the template of the blended
        output's type (its fields that are not predictions, if a denoiser has any, come from it unchanged).
        """
        predictions: list[Prediction] = [None] * len(plan)  # type: ignore[list-item]
        template = None
        split = self._rows_are_split()
        calls = self._calls(plan, together=self._members_share_calls(split))
        vmapped = [
            c[0]
            for c in calls
            if self.vmap_full_members
            and not split
            and not self._caches.active
            and plan[c[0]].member in self.modules_by_name
            and plan[c[0]].rows is None
        ]
        cap = self._rows_per_call(len(latent))
        per_call = len(vmapped) if cap is None else cap // len(latent)  # members whose rows fit in one call
        starts = range(0, len(vmapped), per_call) if per_call > 1 else []
        for group in (vmapped[start : start + per_call] for start in starts):
            if len(group) < 2:  # alone: called on its own below
                continue
            outputs = self._vmapped([plan[p].member for p in group], args, kwargs)
            template = outputs[0] if template is None else template
            for position, output in zip(group, outputs):
                predictions[position] = prediction_of(output)
            calls = [c for c in calls if c[0] not in group]
        for positions in calls:
            stacked, output = self._run_stacked([plan[p] for p in positions], latent, args, kwargs)
            template = output if template is None else template
            for position, prediction in zip(positions, stacked):
                predictions[position] = prediction
        return predictions, template

    def _calls(self, plan: list[Evaluation], together: bool) -> list[list[int]]:
        """Group plan positions into denoiser calls: each full member alone; the base and the LoRA members share
        one module, so (when ``together``) they go together."""
        shared = [p for p, evaluation in enumerate(plan) if evaluation.member not in self.modules_by_name]
        full = [[p] for p, evaluation in enumerate(plan) if evaluation.member in self.modules_by_name]
        if not shared:
            return full
        return ([shared] if together else [[p] for p in shared]) + full

    def _members_share_calls(self, split: bool | None = None) -> bool:
        """Whether members' rows may share a denoiser call now: ``batch_members``, unless an attention processor
        of the base splits a call's rows into parts of its own (:func:`splits_its_rows`, perturbed-attention
        guidance: pipelines install those processors for the duration of their call), or the base reshapes its
        batch inside (:class:`~diffusion_blend.adapters.RowsReshaped`, found at the first call that stacks rows of
        several adapters). Then each member is called on the pipeline's own rows, as the pipeline calls a single
        model. (``split``: :meth:`_rows_are_split`, where the caller has read it already.)"""
        if split is None:
            split = self._rows_are_split()
        return self.batch_members and not self._rows_reshaped and not split

    def _rows_are_split(self) -> bool:
        return any(map(splits_its_rows, {type(layer.processor) for layer in self._attention_layers[BASE]}))

    def _run_stacked(
        self,
        evaluations: list[Evaluation],
        latent: Rows,
        args: tuple,
        kwargs: dict,
        mask: torch.Tensor | None = None,
    ) -> tuple[list[Prediction], Any]:
        """Evaluations on one module as one batch (rows stacked in plan order), chunked by ``max_batch_size``.
        ``mask`` (stacked rows × adapters) routes the rows on the shared base instead of the evaluations' names."""
        batch = len(latent)
        sizes = [batch if e.rows is None else len(e.rows) for e in evaluations]
        module = self.modules_by_name[evaluations[0].member] if evaluations[0].member in self.modules_by_name else None
        routes = (
            mask
            if mask is not None or module is not None
            else [  # every stacked row's adapter
                self.adapter_of.get(e.member, NO_ADAPTER) for e, size in zip(evaluations, sizes) for _ in range(size)
            ]
        )
        total = sum(sizes)
        chunk = self._rows_per_call(batch) or total
        whole_batch = len(evaluations) == 1 and evaluations[0].rows is None and chunk >= batch
        if not whole_batch:  # the batch rows each stacked row takes (none to gather for one evaluation of all rows)
            index = _stacked_rows(evaluations, batch, _like(latent).device)
        pieces, template = [], None
        for start in range(0, total, chunk):
            if whole_batch:
                call_args, call_kwargs = args, kwargs
            else:
                call_args, call_kwargs = self._call_rows(
                    args, kwargs, index[start : start + chunk], batch, isinstance(latent, list)
                )
            chunk_routes = None if routes is None else routes[start : start + chunk]
            call = (tuple(e.member for e in evaluations), tuple(sizes), start)  # its place in the plan
            call_kwargs = self._caches.for_call(call, call_kwargs)
            with self._step_contexts.for_call(module or self.base, call):
                output = self._call(module, chunk_routes, call_args, call_kwargs)
            self._caches.after_call(call, output)
            template = output if template is None else template
            pieces.append(prediction_of(output))
        stacked = _joined(pieces) if len(pieces) > 1 else pieces[0]
        return _split_rows(stacked, sizes), template

    def _call_rows(self, args: tuple, kwargs: dict, rows: torch.Tensor, batch: int, listed: bool) -> tuple[tuple, dict]:
        """The arguments of a call on some ``rows`` of the batch: batched tensors indexed (on their
        :data:`BATCH_AXES`; :data:`GROUPED_ROWS` by sample), per-sample lists (:data:`PER_SAMPLE_LISTS`; every list of
        the batch's length where the sample is a list) taken item by item."""
        host_rows = functools.cache(rows.tolist)  # read back only where a per-sample list needs it

        def take(name: str | None, value: Any) -> Any:
            if name in UNBATCHED_ARGUMENTS:
                return value
            if isinstance(value, list) and len(value) == batch and (listed or name in PER_SAMPLE_LISTS):
                return [value[row] for row in host_rows()]
            if listed and name in PADDED_TO_THE_BATCH and value is not None and set(host_rows()) != set(range(batch)):
                raise ValueError(
                    f"{type(self.base).__name__} pads {name} to the longest sample of the whole batch, so the blend "
                    "cannot call it on some samples only (stochastic mode with full members or batch_members=False, "
                    "a max_batch_size below the batch): use LoRA members batched, and max_batch_size None or 'input'"
                )
            if name in GROUPED_ROWS and isinstance(value, torch.Tensor) and _groups_rows(value, batch):
                return value.unflatten(0, (batch, -1))[rows.to(value.device)].flatten(0, 1)
            axis = BATCH_AXES.get(name, 0)
            if axis and isinstance(value, torch.Tensor) and value.ndim > axis and value.shape[axis] == batch:
                return value.index_select(axis, rows.to(value.device))
            return take_rows(value, rows, batch)

        names = itertools.chain(self._parameter_names, itertools.repeat(None))
        return tuple(map(take, names, args)), {key: take(key, value) for key, value in kwargs.items()}

    def _rows_per_call(self, batch: int) -> int | None:
        """The cap on rows per denoiser call for a call of ``batch`` rows (None: no cap)."""
        if self.max_batch_size == INPUT_ROWS:
            return batch
        if self.max_batch_size is not None and self.max_batch_size < batch and self._rows_are_split():
            raise ValueError(
                f"max_batch_size={self.max_batch_size} would split the pipeline's call of {batch} rows, which the "
                "denoiser's perturbed-attention-guidance processors need together: use max_batch_size='input'"
            )
        return self.max_batch_size

    def _vmapped(self, names: list[str], args: tuple, kwargs: dict) -> list[Any]:
        """Full members on the same inputs in one vmapped call over their stacked weights (kept per group of
        members while their weights, and the first member's settings the weightless copy carries, are unchanged;
        a member's weights are stacked for one group at a time)."""
        modules = [self.modules_by_name[name] for name in names]
        weights = (
            (name, *((p.data_ptr(), p._version) for p in module.parameters())) for name, module in zip(names, modules)
        )
        key = (_call_state(modules[0], self._attention_layers[names[0]]), *weights)
        cached = self._vmap_cache.get(tuple(names))
        if cached is None or cached[0] != key:
            self._vmap_cache = {  # groups sharing a member with this one are superseded
                group: entry for group, entry in self._vmap_cache.items() if not set(group) & set(names)
            }
            params, buffers = _stacked_state(modules)
            if self.compile_options is not None:  # weights, not inputs: CUDA graphs must not copy them every replay
                for tensor in (*params.values(), *buffers.values()):
                    torch._dynamo.mark_static_address(tensor)
            template = copy.deepcopy(modules[0]).to("meta")
            cached = self._vmap_cache[tuple(names)] = (key, params, buffers, template)
        _, params, buffers, template = cached
        try:
            if self.compile_options is None:
                outputs = call_vmapped(template, params, buffers, args, kwargs)
            else:
                outputs = self._compiled("vmapped", call_vmapped, template, params, buffers, args, kwargs)
        except RuntimeError as error:  # what torch.vmap cannot run: an operation it has no batching rule for (Z-Image
            if isinstance(error, torch.OutOfMemoryError):  # pads sequences), a read of values (HiDream's experts)
                raise
            raise ValueError(
                f"{type(template).__name__}'s forward cannot be vmapped over its members' weights "
                f"({str(error).strip().splitlines()[0]}): use vmap_full_members=False"
            ) from error
        stacked = prediction_of(outputs)  # every field of the output is stacked over members
        return [with_prediction(outputs, _member_of_stacked(stacked, i)) for i in range(len(names))]

    def _call(
        self, module: nn.Module | None, routes: list[str] | torch.Tensor | None, args: tuple, kwargs: dict
    ) -> Any:
        """One denoiser call: a full member, or the shared base with each row routed to its LoRA adapter (by
        name, or by a rows × adapters mask)."""
        if isinstance(routes, list):
            routes = routes[0] if len(set(routes)) == 1 else routes
        if self.compile_options is not None:
            return self._compiled_call(module, routes, args, kwargs)
        if module is not None:
            return module(*args, **kwargs)
        if self.router is None:
            return self.base(*args, **kwargs)
        with self.router.route(routes):
            return self.base(*args, **kwargs)

    def _compiled_call(
        self, module: nn.Module | None, routes: str | list[str] | torch.Tensor | None, args: tuple, kwargs: dict
    ) -> Any:
        """The same call through ``torch.compile``: LoRA routing enters the graph as a mask tensor.

        Module hooks are guarded here (TorchDynamo skips hook guards by default), so a graph traced before a hook
        was added or removed (the user's, an offloading library's) is never reused after."""
        if module is not None or self.router is None:
            return self._compiled("module", call_module, module or self.base, args, kwargs)
        latent = args[0] if args else kwargs[self._latent_name]
        mask = (
            routes
            if isinstance(routes, torch.Tensor)
            else self.router.dense_mask(routes, len(latent), like=_like(latent))
        )
        try:
            return self._compiled("routed", call_routed, self.router, mask, self.base, args, kwargs)
        except RowsReshaped as error:  # a compiled call routes every row by the mask, one member's rows too
            raise ValueError(f"{error}; compiled calls route their rows by a mask: use compile=False") from error

    def _compiled(self, kind: str, function: Any, *inputs: Any) -> Any:
        """``function(*inputs)`` compiled with the blend's options (one compiled function per kind of call)."""
        if kind not in self._compiled_functions:
            self._compiled_functions[kind] = torch.compile(function, **self.compile_options)
        graphed = _may_use_cuda_graphs(self.compile_options)
        if graphed:  # each call is a step of its own: its outputs are cloned before the next call replays a graph
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            output = self._compiled_functions[kind](*inputs)
        return with_prediction(output, _cloned(prediction_of(output))) if graphed else output

    # ---------------------------------------------------------------------------------------------------- validation
    def _check_adapters_loaded(self) -> None:
        if not self.adapter_of:
            return
        present = loaded_adapters(self.base)
        missing = [f"{name!r} (adapter {a!r})" for name, a in self.adapter_of.items() if a not in present]
        if missing:
            have = ", ".join(sorted(present)) or "none"
            raise ValueError(f"LoRA member(s) {', '.join(missing)} are not loaded on the base (loaded: {have})")

    def _check_attention_alike(self) -> None:
        """Every full member's attention layers work as the base's where that changes what they compute.

        Perturbed-attention guidance installs its processors for the call on the layers whose names match a pattern
        (``pag_applied_layers``), and the wrapper's members are named ``modules_by_name.<basis>.…``: a pattern that
        matches a basis's name ("mid" in "humid") puts them on every attention layer of that member. FLUX.2 Klein's
        KV pipeline installs processors that read its condition cache on its own transformer only: a member without
        them would ignore the cache. Either way the member would silently be another model."""
        if not self.modules_by_name:
            return
        checks = [
            (
                splits_its_rows,
                "perturbed-attention-guidance processors",
                "a pag_applied_layers pattern of the "
                "pipeline matches the basis's name in the blend (modules_by_name.<basis>.…); choose a basis name "
                "no pattern matches",
            )
        ]
        if self._caches.active:  # (without a cache those processors compute plain attention)
            checks.append(
                (
                    reads_condition_cache,
                    "key/value-cache processors",
                    "give the member the base's processor "
                    "classes (FLUX.2 Klein KV: Flux2KVAttnProcessor and Flux2KVParallelSelfAttnProcessor, as the "
                    "pipeline gives its transformer)",
                )
            )
        for kind, what, remedy in checks:
            base = [kind(type(layer.processor)) for layer in self._attention_layers[BASE]]
            for name in self.modules_by_name:
                layers = self._attention_layers[name]
                differing = [index for index, layer in enumerate(layers) if kind(type(layer.processor)) != base[index]]
                if differing:
                    raise ValueError(
                        f"member {name!r} has {what} on {len(differing)} attention layer(s) where the base has none, "
                        f"or the reverse (e.g. its layer {differing[0]}: "
                        f"{type(layers[differing[0]].processor).__name__}): {remedy}"
                    )

    def _check_placement(self) -> None:
        device, dtype = _placement(self.base)
        for name, module in self.modules_by_name.items():
            member_device, member_dtype = _placement(module)
            _check_offloaded(name, device, member_device, self.vmap_full_members)
            if self.vmap_full_members:
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


# ---------------------------------------------------------------------------------------------------- compilation
def _stacked_state(modules: list[nn.Module]) -> tuple[dict, dict]:
    """The modules' parameters and buffers stacked along a new first axis, for a vmapped call: what
    ``torch.func.stack_module_state`` makes, for inference (it refuses members whose parameters differ in
    ``requires_grad``: a module the user made beside ones the blend loaded frozen)."""
    states = []
    with torch.no_grad():
        for named in (nn.Module.named_parameters, nn.Module.named_buffers):
            per_module = [dict(named(module)) for module in modules]
            states.append({name: torch.stack([tensors[name] for tensors in per_module]) for name in per_module[0]})
    return states[0], states[1]


def call_module(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A plain denoiser call (compiled by :meth:`BlendedDenoiser._compiled_call`)."""
    return module(*args, **kwargs)


def call_vmapped(template: nn.Module, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
    """Full members on the same inputs in one ``torch.vmap`` call of ``template`` (a weightless copy of their
    architecture) over their stacked weights: the denoiser's output type, every field stacked over members."""

    def call(member_params, member_buffers):
        return functional_call(template, (member_params, member_buffers), args, kwargs)

    return torch.vmap(call)(params, buffers)


def call_routed(router: AdapterRouter, mask: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A call of the shared base with its rows routed by ``mask``: setting the router's mask inside the traced
    function makes it an input of the graph, so new routings reuse the graph."""
    router.row_mask = mask
    try:
        return module(*args, **kwargs)
    finally:
        router.row_mask = None


def was_compiled(module: object) -> bool:
    """Whether a module was given compiled: wrapped by ``torch.compile(module)``, or compiled in place, whole or by
    regions (``module.compile()``, diffusers' ``compile_repeated_blocks``)."""
    if is_compiled_module(module):
        return True
    inner = module.modules() if isinstance(module, nn.Module) else ()
    return any(getattr(part, "_compiled_call_impl", None) is not None for part in inner)


def _may_use_cuda_graphs(options: Mapping[str, Any]) -> bool:
    """Whether torch.compile may replay CUDA graphs, whose outputs the next replay overwrites."""
    extra = options.get("options") or {}
    return options.get("mode") in ("reduce-overhead", "max-autotune") or bool(extra.get("triton.cudagraphs"))


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


# ------------------------------------------------------------------------------------------------- denoiser outputs
def prediction_of(output: Any) -> Prediction:
    """The prediction in a denoiser's output: the output itself (a tensor), else its fields that hold rows (tensors,
    or lists of per-sample tensors: Z-Image) — one, or :class:`Fields` where there are several (LTX-2's video and
    audio). Other fields (``None``, a cache object) are not predictions."""
    if isinstance(output, torch.Tensor):
        return output
    predicted = [value for value in _output_fields(output).values() if _holds_rows(value)]
    if not predicted:
        raise TypeError(f"cannot find the prediction in a denoiser output of type {type(output).__name__}")
    return predicted[0] if len(predicted) == 1 else Fields(predicted)


def with_prediction(template: Any, prediction: Prediction) -> Any:
    """``template`` (a denoiser output) with its prediction fields replaced, keeping its type and any other fields."""
    if isinstance(template, torch.Tensor):
        return prediction
    fields = _output_fields(template)
    replaced = iter(prediction if isinstance(prediction, Fields) else [prediction])
    fields = {key: next(replaced) if _holds_rows(value) else value for key, value in fields.items()}
    if isinstance(template, (tuple, list)):
        return type(template)(fields.values())
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **fields)
    return type(template)(fields)


def _output_fields(output: Any) -> dict:
    """A denoiser output's fields in order: a tuple's or list's items by position, a ``BaseOutput``'s (an ordered
    dict) or another mapping's by key."""
    if isinstance(output, (tuple, list)):
        return dict(enumerate(output))
    if isinstance(output, Mapping):
        return dict(output)
    raise TypeError(f"cannot read a denoiser output of type {type(output).__name__}")


def _holds_rows(value: Any) -> bool:
    """Whether an output field is a prediction: a tensor of rows, or a list of per-sample tensors (or lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.ndim > 0
    return isinstance(value, list) and bool(value) and all(isinstance(item, (torch.Tensor, list)) for item in value)


def _kl_scales_per_sample(kl_scale: float | Sequence[float], weight_samples: int) -> tuple[float, ...]:
    """``set_blend``'s λ as one shared by every sample or one per sample (as many as weights given per sample)."""
    if isinstance(kl_scale, Sequence) and not isinstance(kl_scale, str):
        if not kl_scale or (weight_samples > 1 and len(kl_scale) != weight_samples):
            raise ValueError(
                f"kl_scale must be a number or one per sample ({weight_samples} with the weights given), "
                f"got {len(kl_scale)} values"
            )
        return tuple(validate_kl_scale(value) for value in kl_scale)
    return (validate_kl_scale(kl_scale),)


def _weights_per_sample(weights: Mapping[str, float] | Sequence[Mapping[str, float]]) -> list[Mapping[str, float]]:
    """``set_blend``'s weights as a list of mappings: one shared by every sample, or one per sample."""
    if isinstance(weights, Mapping):
        return [weights]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
        raise ValueError(
            "weights must be a mapping of basis name to weight, or a non-empty list of them (one per "
            f"sample), got {weights!r}"
        )
    return list(weights)


def _stacked_rows(evaluations: list[Evaluation], batch: int, device: torch.device) -> torch.Tensor:
    """The batch row of every stacked row, evaluations one after another."""
    if all(evaluation.rows is None for evaluation in evaluations):  # a mix blend: the same every step
        return _repeated_batch_rows(len(evaluations), batch, device)
    return torch.cat([e.rows if e.rows is not None else torch.arange(batch, device=device) for e in evaluations])


@functools.lru_cache(maxsize=64)
def _repeated_batch_rows(repeats: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device).repeat(repeats)


def _groups_rows(value: torch.Tensor, batch: int) -> bool:
    """Whether a :data:`GROUPED_ROWS` tensor holds several rows per sample (its first size a multiple of the batch)."""
    return value.ndim > 0 and value.shape[0] > batch and value.shape[0] % batch == 0


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


# -------------------------------------------------------------------------------------------- batches of predictions
def _like(batch: Rows) -> torch.Tensor:
    """A tensor of the batch's device and dtype (its first; lists of lists in Z-Image's omni mode)."""
    return _tensors_of(batch)[0]


def _tensors_of(sample: Any) -> list[torch.Tensor]:
    """The tensors of a sample (or batch), in order: itself, or those of its (nested) list."""
    if isinstance(sample, torch.Tensor):
        return [sample]
    return [tensor for item in sample for tensor in _tensors_of(item)]


def blend_rows(
    base: Prediction | None, members: list[Prediction], weights: list[float] | torch.Tensor, kl_scale: float
) -> Prediction:
    """:func:`~diffusion_blend.blend.blend_predictions` of batched predictions — with ``weights`` a (rows, members)
    table, :func:`~diffusion_blend.blend.blend_per_row` — sample by sample for lists, field by field for
    several-output denoisers."""
    if not members:  # (λ = 0, or no weight on any member)
        return base
    first = base if base is not None else members[0]
    if isinstance(first, Fields):
        return Fields(
            blend_rows(None if base is None else base[index], [member[index] for member in members], weights, kl_scale)
            for index in range(len(first))
        )
    per_row = isinstance(weights, torch.Tensor)
    if not isinstance(first, list):
        return (blend_per_row if per_row else blend_predictions)(base, members, weights, kl_scale)
    if not per_row:
        bases = base if base is not None else [None] * len(first)
        return [blend_predictions(b, list(samples), weights, kl_scale) for b, *samples in zip(bases, *members)]
    bases = base if base is not None else [None] * len(first)  # each sample as a batch of one row
    return [
        blend_per_row(
            None if b is None else b[None], [sample[None] for sample in samples], weights[row : row + 1], kl_scale
        )[0]
        for row, (b, *samples) in enumerate(zip(bases, *members))
    ]


def _joined(pieces: list[Prediction]) -> Prediction:
    """Predictions of consecutive rows, one after another."""
    if isinstance(pieces[0], Fields):
        return Fields(_joined([piece[index] for piece in pieces]) for index in range(len(pieces[0])))
    return torch.cat(pieces) if isinstance(pieces[0], torch.Tensor) else list(itertools.chain(*pieces))


def _split_rows(stacked: Prediction, sizes: list[int]) -> list[Prediction]:
    """Consecutive rows of ``sizes`` rows each."""
    if isinstance(stacked, Fields):
        return [Fields(parts) for parts in zip(*(_split_rows(field, sizes) for field in stacked))]
    if isinstance(stacked, torch.Tensor):
        return list(stacked.split(sizes))
    starts = list(itertools.accumulate(sizes, initial=0))
    return [stacked[start:stop] for start, stop in zip(starts, starts[1:])]


def _placed_rows(batch: int, parts: list[tuple[torch.Tensor, Prediction]]) -> Prediction:
    """The predictions of parts of the batch (their rows, their predictions) put back in the batch's order."""
    first = parts[-1][1]
    if isinstance(first, Fields):
        return Fields(
            _placed_rows(batch, [(rows, prediction[index]) for rows, prediction in parts])
            for index in range(len(first))
        )
    if isinstance(first, torch.Tensor):
        placed = first.new_empty((batch, *first.shape[1:]))
        for rows, prediction in parts:
            placed[rows] = prediction
        return placed
    by_sample: list[torch.Tensor] = [None] * batch  # type: ignore[list-item]
    for rows, prediction in parts:
        for row, sample in zip(rows.tolist(), prediction):
            by_sample[row] = sample
    return by_sample


def _member_of_stacked(stacked: Prediction, member: int) -> Prediction:
    """One member's prediction from a vmapped call's (members first)."""
    if isinstance(stacked, Fields):
        return Fields(_member_of_stacked(field, member) for field in stacked)
    return stacked[member] if isinstance(stacked, torch.Tensor) else [sample[member] for sample in stacked]


def _cloned(prediction: Prediction) -> Prediction:
    """A copy of a prediction's tensors (a CUDA graph's outputs are overwritten by its next replay)."""
    if isinstance(prediction, torch.Tensor):
        return prediction.clone()
    return type(prediction)(_cloned(item) for item in prediction)


# ----------------------------------------------------------------------------------------------------------- helpers
class _DrawCache:
    """The stochastic mode's draws, made on the latents' device without reading anything back to the host: a row
    takes the draw of the first identical row of its call or, when the previous call was at the same timestep,
    of its identical row there. Rows are compared by a 64-bit hash of their bits, in one sort of the previous
    call's rows and this call's (the lab draws for tens of thousands of rows at once; a sampling step has a few
    rows, and every operation here is a kernel launch on a GPU)."""

    def __init__(self):
        self.previous: tuple[torch.Tensor, torch.Tensor, Any] | None = None  # (row hashes, draws, timestep)

    def draw(
        self, latent: Rows, timestep: Any, probabilities: torch.Tensor, generator, samples: int = 1
    ) -> torch.Tensor:
        """One member index per row; ``probabilities`` is w, or one row of it per sample where ``samples`` blends
        differ (weights or λ per sample: their samples are told apart even where a sweep gives them one noise)."""
        hashes = _sample_hashes(latent)
        if samples > 1:
            hashes = hashes ^ _per_row(_sample_salts(samples, hashes.device), len(hashes))
        timestep = _comparable_timestep(timestep, hashes.device)
        known = self.previous if timestep is not None else None
        same_step = known is not None and known[2] is not None and known[2] == timestep  # (a tensor on a GPU)
        known = known if same_step is not False else None
        if probabilities.ndim == 1:
            fresh = torch.multinomial(probabilities, len(hashes), replacement=True, generator=generator)
        else:  # one row per sample: row r is sample r mod S's
            fresh = _drawn_per_row(_per_row(probabilities, len(hashes)), generator)
        keys, candidates = hashes, fresh.to(hashes.device, non_blocking=True)
        if known is not None:  # the previous rows first: an identical one then comes before this call's rows
            previous = known[0]
            if same_step is not True:  # decided on the device: at another step no previous row may match
                previous = torch.where(same_step, previous, previous ^ NEW_STEP_SALT)
            keys, candidates = torch.cat([previous, hashes]), torch.cat([known[1], candidates])
        order = torch.argsort(keys, stable=True)
        first = order[torch.searchsorted(keys[order], hashes)]  # the first row of each row's key (stable sort)
        draws = candidates[first]
        self.previous = (hashes, draws, timestep)
        return draws


def _drawn_per_row(probabilities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of a (rows × members) probability table, by inverse transform sampling: a uniform number
    against the row's cumulative probabilities (``torch.multinomial`` with one draw per row checks its input with
    host reads, which make a GPU wait)."""
    uniform = torch.rand(
        len(probabilities), 1, generator=generator, device=probabilities.device, dtype=probabilities.dtype
    )
    return (uniform >= probabilities.cumsum(1)).sum(1).clamp_max(probabilities.shape[1] - 1)


def _per_row(per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """A (samples, …) table repeated for ``rows`` rows: the rows are the samples, repeated."""
    if rows % len(per_sample):
        raise ValueError(
            f"weights are given for {len(per_sample)} samples, but the denoiser is called with {rows} "
            "rows (not that many samples, repeated): give one weight mapping per image"
        )
    return per_sample.repeat(rows // len(per_sample), *[1] * (per_sample.ndim - 1))


#: XORed into the previous call's row hashes at a new step: they then match no row of this call (a salted hash
#: equals another row's hash as rarely as two distinct rows' hashes do)
NEW_STEP_SALT = 0x2545F4914F6CDD1D


def _sample_hashes(latent: Rows) -> torch.Tensor:
    """One hash per sample: a row of the latent tensor, or an item of a per-sample list (Z-Image; in its omni mode a
    list of the sample's tensors, hashed together)."""
    if isinstance(latent, list):
        return torch.cat(
            [
                _row_hashes(torch.cat([t.detach().reshape(-1) for t in _tensors_of(sample)]).reshape(1, -1))
                for sample in latent
            ]
        )
    return _row_hashes(latent.detach().reshape(len(latent), -1))


def _row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of each row's bits: every element's bits are scrambled (xor-shift-multiply, so structured
    differences such as a flipped sign bit do not cancel), then summed with fixed random odd weights in wrapping
    int64 arithmetic. Distinct rows collide with a probability of the order of 2⁻⁶⁰."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[rows.element_size()]
    bits = rows.contiguous().view(integer).to(torch.int64)
    bits = (bits ^ (bits >> 29)) * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    bits = bits ^ (bits >> 32)
    return (bits * _hash_multipliers(rows.shape[1], rows.device)).sum(1)


@functools.lru_cache(maxsize=16)
def _sample_salts(samples: int, device: torch.device) -> torch.Tensor:
    """A fixed random 64-bit salt per sample index, XORed into its rows' hashes."""
    generator = torch.Generator().manual_seed(0x2545F491)
    return torch.randint(-(2**62), 2**62, (samples,), generator=generator, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=16)
def _hash_multipliers(length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0x5DEECE66D)
    multipliers = torch.randint(-(2**62), 2**62, (length,), generator=generator, dtype=torch.int64) * 2 + 1
    return multipliers.to(device)


def _comparable_timestep(timestep: Any, device: torch.device) -> Any:
    """The timestep as a Python number or a 0-d tensor on ``device`` (compared there, without a host read)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return timestep.detach().reshape(-1)[0].to(device, non_blocking=True).clone()
    return float(timestep) if isinstance(timestep, (int, float)) else None


def _rows_by_member(drawn: torch.Tensor, names: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """(member name, its rows) for every member drawn at least once, in member order."""
    drawn = drawn.to(device)
    return [(names[member], (drawn == member).nonzero().squeeze(1)) for member in torch.unique(drawn).tolist()]


class SignedForward:
    """The wrapper's ``forward``: calls the blend, and reports the wrapped denoiser's signature to ``inspect``.

    An object rather than a closure, so that copies of the wrapper (``copy.deepcopy``) call their own blend."""

    def __init__(self, owner: BlendedDenoiser, signature: inspect.Signature):
        self.owner = owner
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._blend(*args, **kwargs)


def _sample_and_timestep_parameters(module: nn.Module) -> tuple[str, tuple[str, int] | None]:
    """The name of the denoiser's first parameter (the noisy sample), and the name and position of its timestep:
    the parameter named so (SD3's and Flux's transformers take ``encoder_hidden_states`` second), else the second."""
    parameters = list(inspect.signature(module.forward).parameters.values())
    if not parameters or parameters[0].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise ValueError(f"cannot tell which argument of {type(module).__name__}.forward is the noisy sample")
    names = [parameter.name for parameter in parameters]
    named = next((name for name in TIMESTEP_NAMES if name in names), None)
    if named is not None:
        return names[0], (named, names.index(named))
    if len(parameters) > 1 and parameters[1].kind not in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ):
        return names[0], (names[1], 1)
    return names[0], None


def splits_its_rows(processor_class: type) -> bool:
    """Whether an attention processor splits a call's rows into parts of different roles: diffusers' perturbed-
    attention-guidance processors (``PAG…``) take the rows as [unconditional;] conditional; perturbed thirds or
    halves. Stacking members' rows in one call would mix those parts up."""
    return processor_class.__name__.startswith("PAG")


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


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a module: as diffusers reads them for its models (their compute dtype: modules kept in
    float32 in a half-precision model, ``_keep_in_fp32_modules``, and layerwise casting's storage do not count),
    else from the first floating-point parameter or buffer."""
    if isinstance(module, ModelMixin):
        return module.device, module.dtype
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def check_member_name(name: object) -> None:
    """A basis name keys module dictionaries (the members', peft's adapters): it cannot hold a '.', nor be a name
    torch modules already have (``train``, ``to``, ...)."""
    if not isinstance(name, str) or not name or any(c in name for c in ".,=") or name == BASE or name.isspace():
        raise ValueError(f"basis name {name!r} must be a non-empty string without '.', ',' or '='")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"basis name {name!r} is the name of a torch module attribute: choose another")


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


def _check_same_architecture(name: str, base: nn.Module, member: nn.Module) -> None:
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


def _check_same_settings(
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


def _describe_freeu(settings: tuple) -> str:
    return str(dict(zip(FREEU_FACTORS, settings[0]))) if settings and settings[0][0] is not None else "off"


def _describe_scales(scales: tuple) -> str:
    present = sorted({str(scale) for scale in scales if scale is not None})
    return f"scales {present}" if present else "none"


def _ip_adapter_scales(attention_layers: list[nn.Module]) -> tuple:
    """Per attention layer, the scales of its IP-Adapter processor (one per loaded adapter), None without one."""
    return tuple(
        getattr(layer.processor, "scale", None) if hasattr(layer.processor, "to_k_ip") else None
        for layer in attention_layers
    )


def _call_state(module: nn.Module, attention_layers: list[nn.Module]) -> tuple:
    """What a call of a module depends on besides its weights and inputs, as far as diffusers' settings go."""
    return (
        _freeu_settings(module),
        tuple(type(layer.processor) for layer in attention_layers),
        _ip_adapter_scales(attention_layers),
    )


def _attention_layers(module: nn.Module) -> list[nn.Module]:
    """The module's attention layers: those with an attention processor (which pipelines may swap)."""
    return [part for part in module.modules() if hasattr(part, "processor")]


def _freeu_settings(module: nn.Module) -> tuple:
    return tuple(
        tuple(getattr(block, factor, None) for factor in FREEU_FACTORS) for block in getattr(module, "up_blocks", ())
    )


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


def _check_prediction_types(base: nn.Module, members: Mapping[str, nn.Module]) -> None:
    declared = {"base": declared_prediction_type(base)}
    declared.update({f"member {name!r}": declared_prediction_type(module) for name, module in members.items()})
    known = {who: kind for who, kind in declared.items() if kind is not None}
    if len(set(known.values())) > 1:
        raise ValueError(
            "members must share one prediction type: "
            + ", ".join(f"{who} predicts {kind}" for who, kind in known.items())
        )


__all__ = ["BASE", "BlendedDenoiser", "Evaluation", "Fields", "prediction_of", "take_rows", "with_prediction"]
