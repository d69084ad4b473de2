"""BlendedDenoiser: a stand-in for a pipeline's denoiser (UNet or transformer) that returns the blended prediction.

Like k-diffusion's model wrappers, it is called exactly as the wrapped module is called and returns the same type,
so any sampling loop (a diffusers pipeline, a hand-written loop, the lab's exact samplers) runs Diffusion Blend
without knowing it. Members are full fine-tuned modules of the base's architecture, or names of peft LoRA
adapters loaded on the base (evaluated on the shared base through :class:`~diffusion_blend.adapters.AdapterRouter`).

Every forward call is planned as a list of *evaluations* — (member, rows of the batch) — and then executed; the
plan decides what the formula needs (the base only where its coefficient is non-zero, members only where their
weight is), the :class:`~diffusion_blend.execution.Executor` decides how many denoiser calls that takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .adapters import NO_ADAPTER, RowsReshaped, loaded_adapters
from .arguments import CallSignature
from .blend import base_coefficient, check_coefficients, validate_kl_scale, validate_weights, weighed_names
from .caches import CONDITION_CACHES_IN_STOCHASTIC_MODE, reads_condition_cache, uses_step_cache
from .checks import (
    check_member_name,
    check_placement,
    check_prediction_types,
    check_processors_alike,
    check_same_architecture,
    check_same_settings,
    splits_its_rows,
)
from .compiled import compile_options, was_compiled
from .draws import DrawCache, per_row, rows_by_member
from .execution import INPUT_ROWS, Evaluation, Executor
from .face import DenoiserFace
from .predictions import Prediction, Rows, blend_rows, like, placed_rows, with_prediction

#: The base's name in an evaluation plan (peft's own name for "no adapter", so it can never be a member's name).
BASE = NO_ADAPTER
MODES = ("mix", "stochastic")


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


class BlendedDenoiser(DenoiserFace):
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
        _check_members(members, max_batch_size)
        options = compile_options(compile, any(was_compiled(module) for module in (base, *members.values())))
        self.base = base = unwrap_module(base)
        members = {name: unwrap_module(member) for name, member in members.items()}
        #: members given as the base module itself (a basis that leaves this denoiser unchanged: one Wan 2.2 expert
        #: fine-tuned, the other not): the base's prediction, evaluated with the base
        self.same_as_base = {name for name, member in members.items() if member is base}
        self.modules_by_name = nn.ModuleDict(
            {n: m for n, m in members.items() if isinstance(m, nn.Module) and n not in self.same_as_base}
        )
        self.adapter_of = {name: member for name, member in members.items() if isinstance(member, str)}
        self.names = list(members)
        self._check_adapters_loaded()
        for name, module in self.modules_by_name.items():
            check_same_architecture(name, base, module)
        check_prediction_types(base, self.modules_by_name)
        self.signature = CallSignature(base)
        self.executor = Executor(
            base,
            self.modules_by_name,
            self.adapter_of,
            self.signature,
            batch_members=batch_members,
            max_batch_size=max_batch_size,
            vmap_full_members=vmap_full_members,
            compile_options=options,
        )
        self.settings: BlendSettings | None = None
        self._draws: DrawCache | None = None
        self._draw_probabilities: torch.Tensor | None = None
        self._row_tables: dict[tuple, torch.Tensor] = {}  # per-sample λ·w (or λ) as (rows, columns), per call shape
        #: called with (the blend's prediction, the base's) after every mix call while set: the SMC corrector weighs
        #: each step by the base's transition against the blend's. The base is then evaluated in every call (one more
        #: row per sample where 1 − λΣw = 0), in the same batched call as the members.
        self.observe_base: Callable[[Prediction, Prediction], None] | None = None
        self.forward = SignedForward(self, self.signature.signature)

    @property
    def router(self):
        """The :class:`~diffusion_blend.adapters.AdapterRouter` of the LoRA members (None without any)."""
        return self.executor.router

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """The ``torch.compile`` options of the blend's calls (None: eager calls)."""
        return None if self.executor.compiled is None else self.executor.compiled.options

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
        layers = self.executor.attention_layers
        for name, module in self.modules_by_name.items():  # again: the base may have changed (an IP-Adapter loaded)
            check_same_architecture(name, self.base, module)
            check_same_settings(name, self.base, module, layers[BASE], layers[name])
        check_placement(self.base, self.modules_by_name, self.executor.vmap_full_members)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if mode == "stochastic":
            self._refuse_step_caches()
        settings = BlendSettings(checked, _kl_scales_per_sample(kl_scale, len(checked)), mode, generator)
        for sample_weights, sample_kl_scale in settings.samples:
            check_coefficients(sample_weights, sample_kl_scale, self.dtype)
        self.settings = settings
        self._draws = None
        self._draw_probabilities = self._probabilities() if mode == "stochastic" else None
        self.executor.caches.clear()
        self._row_tables = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Called exactly like the base denoiser (each instance reports the base's signature); returns the blend."""
        return self._blend(*args, **kwargs)

    def _blend(self, *args: Any, **kwargs: Any) -> Any:
        if self.settings is None:
            raise RuntimeError("call set_blend(weights, ...) before using the BlendedDenoiser")
        latent = self.signature.sample(args, kwargs)
        caches = self.executor.caches
        try:  # (whatever fails, the call's condition caches are let go)
            self._begin_caches(kwargs)
            self._check_attention_alike()
            if self.settings.mode == "mix":
                blend = self._mix
            else:  # drawn once per call: a call redone below must not draw again (the seed's later draws would shift)
                timestep = self.signature.timestep(args, kwargs)
                drawn = self.draw_members(latent, timestep) if any(self.settings.kl_scales) else None
                blend = functools.partial(self._stochastic, drawn=drawn)
            with self.routing(), self._lora_scaled(kwargs):
                try:
                    result = blend(latent, args, kwargs)
                except RowsReshaped:
                    if not self.executor.members_share_calls():
                        raise
                    self.executor.rows_reshaped = True  # found at the first call: from now on, one call per member
                    result = blend(latent, args, kwargs)
        except BaseException:
            caches.reset()
            raise
        caches.end(result)
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
        caches = self.executor.caches
        caches.begin(kwargs)
        if caches.active and self.settings.mode == "stochastic":
            raise ValueError(CONDITION_CACHES_IN_STOCHASTIC_MODE)
        if caches.active and self.compile_options is not None:
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
        scale = self.signature.lora_scale(kwargs)
        return self.router.scaled(scale) if self.router is not None and scale != 1 else contextlib.nullcontext()

    # --------------------------------------------------------------------------------------------------- DB-MPA (mix)
    def plan_mix(self) -> list[Evaluation]:
        """What the mix formula needs: members with λ·w ≠ 0 (for some sample), and the base unless 1 − λΣw = 0 (for
        every sample; a member that is the base adds nothing to the sum: w (base − base))."""
        per_sample = [
            ({name: w for name, w in weights.items() if name not in self.same_as_base}, kl_scale)
            for weights, kl_scale in self.settings.samples
        ]
        members = [Evaluation(name) for name in weighed_names(per_sample)]
        needs_base = self.observe_base is not None or any(
            base_coefficient(weights.values(), kl_scale) != 0 for weights, kl_scale in per_sample
        )
        return ([Evaluation(BASE)] if needs_base else []) + members

    def _mix(self, latent: Rows, args: tuple, kwargs: dict) -> Any:
        plan = self.plan_mix()
        predictions, template = self.executor.evaluate(plan, latent, args, kwargs)
        by_member = dict(zip((evaluation.member for evaluation in plan), predictions))
        members = [name for name in by_member if name != BASE]
        base, member_predictions = by_member.get(BASE), [by_member[name] for name in members]
        if len(self.settings.samples) == 1:
            weights = [self.settings.weights[0][name] for name in members]
            blended = blend_rows(base, member_predictions, weights, self.settings.kl_scale)
        else:  # λ·w per row, so that λ too may differ from sample to sample
            blended = blend_rows(base, member_predictions, self._per_row_table(tuple(members), latent), 1.0)
        if self.observe_base is not None:
            self.observe_base(blended, base)
        return with_prediction(template, blended)

    def _per_row_table(self, members: tuple[str, ...] | None, latent: Rows) -> torch.Tensor:
        """Per sample λ·w of ``members`` (or λ alone: None) as a (rows, columns) table for a call on ``latent``, row
        r taking sample r mod S's (the rows are the S samples repeated); made on the host once per call shape (the
        same every step of a pipeline call) and copied without waiting (on a GPU a blocking copy would)."""
        device = like(latent).device
        key = (members, len(latent), device)
        if key not in self._row_tables:
            table = [
                [kl_scale * weights[name] for name in members] if members is not None else [kl_scale]
                for weights, kl_scale in self.settings.samples
            ]
            dtype = torch.float64 if like(latent).dtype == torch.float64 else torch.float32  # (not on every device)
            host = per_row(torch.tensor(table, dtype=torch.float64), len(latent)).to(dtype)
            host = host.pin_memory() if device.type == "cuda" else host
            self._row_tables[key] = host.to(device, non_blocking=True)
        return self._row_tables[key]

    # ------------------------------------------------------------------------------------------ DB-MPA-LS (stochastic)
    def _stochastic(self, latent: Rows, args: tuple, kwargs: dict, drawn: torch.Tensor | None) -> Any:
        """DB-MPA-LS with the call's draws (one member index per row; None where λ = 0)."""
        if not any(self.settings.kl_scales):  # the blend is the base, whichever member is drawn
            predictions, template = self.executor.evaluate([Evaluation(BASE)], latent, args, kwargs)
            return with_prediction(template, predictions[0])
        if self.router is not None and not self.modules_by_name and self.executor.members_share_calls():
            return self._stochastic_routed(drawn, latent, args, kwargs)
        plan = [Evaluation(name, rows) for name, rows in rows_by_member(drawn, self.names, like(latent).device)]
        if any(kl_scale != 1 for kl_scale in self.settings.kl_scales):
            plan.insert(0, Evaluation(BASE))
        predictions, template = self.executor.evaluate(plan, latent, args, kwargs)
        parts = [(e.rows, prediction) for e, prediction in zip(plan, predictions) if e.rows is not None]
        base = predictions[0] if plan[0].member == BASE else None
        return with_prediction(template, self._towards_drawn(base, placed_rows(len(latent), parts), latent))

    def _stochastic_routed(self, drawn: torch.Tensor, latent: Rows, args: tuple, kwargs: dict) -> Any:
        """LoRA members only: every row goes through its drawn adapter in one call on the shared base (after the
        base's own rows where λ ≠ 1), routed by a mask built on the latents' device from the draws. Nothing is read
        back to the host, so a GPU is never made to wait (row lists per member would need that)."""
        mask = self.router.member_mask([self.adapter_of.get(name) for name in self.names], drawn, like=like(latent))
        plan = [Evaluation(self.names[0])]  # its rows are routed by the mask: each to its drawn adapter
        if all(kl_scale == 1 for kl_scale in self.settings.kl_scales):  # the drawn members' predictions are the blend
            predictions, template = self.executor.evaluate(plan, latent, args, kwargs, mask=mask)
            return with_prediction(template, predictions[-1])
        plan.insert(0, Evaluation(BASE))
        mask = torch.cat([torch.zeros_like(mask), mask])
        predictions, template = self.executor.evaluate(plan, latent, args, kwargs, mask=mask)
        return with_prediction(template, self._towards_drawn(predictions[0], predictions[-1], latent))

    def _towards_drawn(self, base: Prediction | None, drawn: Prediction, latent: Rows) -> Prediction:
        """DB-MPA-LS's ``base + λ (member_I − base)`` with the drawn members' predictions (λ per sample or shared)."""
        if self.settings.kl_scale is not None:
            return blend_rows(base, [drawn], [1.0], self.settings.kl_scale)
        return blend_rows(base, [drawn], self._per_row_table(None, latent), 1.0)

    def draw_members(self, latent: Rows, timestep: Any = None) -> torch.Tensor:
        """DB-MPA-LS: one member index per row, drawn with probability w per *sample and denoising step*, as a
        tensor on the latents' device (:class:`~diffusion_blend.draws.DrawCache`: rows with identical latents are
        one sample and share their draw, within a call and with the previous call at the same timestep)."""
        if self._draw_probabilities is None:
            raise RuntimeError("draw_members needs set_blend(..., mode='stochastic') first")
        if self._draws is None:
            self._draws = DrawCache()
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
        layers = self.executor.attention_layers
        members = {name: layers[name] for name in self.modules_by_name}
        check_processors_alike(
            layers[BASE],
            members,
            splits_its_rows,
            "perturbed-attention-guidance processors",
            "a pag_applied_layers pattern of the pipeline matches the basis's name in the blend "
            "(modules_by_name.<basis>.…); choose a basis name no pattern matches",
        )
        if self.executor.caches.active:  # (without a cache those processors compute plain attention)
            check_processors_alike(
                layers[BASE],
                members,
                reads_condition_cache,
                "key/value-cache processors",
                "give the member the base's processor classes (FLUX.2 Klein KV: Flux2KVAttnProcessor and "
                "Flux2KVParallelSelfAttnProcessor, as the pipeline gives its transformer)",
            )


class SignedForward:
    """The wrapper's ``forward``: calls the blend, and reports the wrapped denoiser's signature to ``inspect``.

    An object rather than a closure, so that copies of the wrapper (``copy.deepcopy``) call their own blend."""

    def __init__(self, owner: BlendedDenoiser, signature: inspect.Signature):
        self.owner = owner
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._blend(*args, **kwargs)


def _check_members(members: Mapping[str, nn.Module | str], max_batch_size: int | str | None) -> None:
    if not isinstance(members, Mapping) or not members:
        raise ValueError("a blend needs at least one basis member (members is empty)")
    for name in members:
        check_member_name(name)
    odd = [name for name, member in members.items() if not isinstance(member, (nn.Module, str))]
    if odd:
        raise ValueError(f"member(s) {odd} must be an nn.Module or the name of a LoRA adapter on the base")
    if max_batch_size not in (None, INPUT_ROWS) and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
    ):
        raise ValueError(f"max_batch_size must be a positive integer, {INPUT_ROWS!r} or None, got {max_batch_size!r}")


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


__all__ = ["BlendedDenoiser"]
