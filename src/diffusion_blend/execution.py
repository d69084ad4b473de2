"""Running an evaluation plan — (member, rows of the batch) pairs — in as few denoiser calls as the members allow.

The base and the LoRA members share one module, so their rows are stacked in one call, each row routed to its
adapter (:class:`~diffusion_blend.adapters.AdapterRouter`): the same FLOPs in one call, so a call's fixed cost is
paid once. Full members are called on their own, or vmapped together over their stacked weights. Calls are chunked
by ``max_batch_size``, and may go through ``torch.compile`` (:mod:`~diffusion_blend.compiled`). Each call keeps its
own condition cache and step-cache context (:mod:`~diffusion_blend.caches`), found again at the next step by the
call's place in the plan.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .adapters import NO_ADAPTER, AdapterRouter, RowsReshaped
from .arguments import CallSignature
from .caches import ConditionCaches, StepCacheContexts
from .checks import attention_layers, call_state, splits_its_rows
from .compiled import CompiledCalls, StackedWeights, call_module, call_routed, call_vmapped
from .predictions import Prediction, Rows, joined, like, member_of_stacked, prediction_of, split_rows, with_prediction

#: ``max_batch_size`` that caps a call at the rows the denoiser was called with (a single model's call)
INPUT_ROWS = "input"


class Evaluation(NamedTuple):
    """One member (or the base, :data:`~diffusion_blend.adapters.NO_ADAPTER`) to evaluate on some rows of the batch
    (``None``: all rows)."""

    member: str
    rows: torch.Tensor | None = None


class Executor:
    """Evaluates plans on a base, its full members (name → module) and its LoRA members (name → adapter name).

    ``batch_members``, ``max_batch_size``, ``vmap_full_members`` and ``compile_options`` are
    :class:`~diffusion_blend.denoiser.BlendedDenoiser`'s arguments of those names (``compile_options``: torch.compile
    options, or None for eager calls)."""

    def __init__(
        self,
        base: nn.Module,
        full_members: Mapping[str, nn.Module],
        adapter_of: Mapping[str, str],
        signature: CallSignature,
        *,
        batch_members: bool,
        max_batch_size: int | str | None,
        vmap_full_members: bool,
        compile_options: Mapping[str, Any] | None,
    ):
        self.base, self.full_members, self.adapter_of, self.signature = base, full_members, adapter_of, signature
        self.router = AdapterRouter(base, list(adapter_of.values())) if adapter_of else None
        self.batch_members, self.max_batch_size, self.vmap_full_members = (
            batch_members,
            max_batch_size,
            vmap_full_members,
        )
        self.compiled = CompiledCalls(compile_options) if compile_options is not None else None
        self.stacked_weights = StackedWeights(mark_static=self.compiled is not None)
        #: each module's attention layers (their processors are what pipelines swap), the base's under NO_ADAPTER
        self.attention_layers = {name: attention_layers(module) for name, module in self.modules().items()}
        self.caches = ConditionCaches()  # each call's own condition keys and values, where a pipeline caches them
        self.step_contexts = StepCacheContexts()  # each call's own context for diffusers' step caches
        self.rows_reshaped = False  # the base reshapes its batch inside: LoRA members cannot share its calls

    def modules(self) -> dict[str, nn.Module]:
        """The base (under :data:`~diffusion_blend.adapters.NO_ADAPTER`) and every full member."""
        return {NO_ADAPTER: self.base, **self.full_members}

    def evaluate(
        self, plan: list[Evaluation], latent: Rows, args: tuple, kwargs: dict, mask: torch.Tensor | None = None
    ) -> tuple[list[Prediction], Any]:
        """The predictions of the plan's evaluations, in plan order, and one raw output of the denoiser as the
        template of the blended output's type (its fields that are not predictions come from it unchanged).

        ``mask`` (stacked rows × adapters) routes a plan of the shared base's evaluations by rows instead of by
        the evaluations' names, in one call."""
        if mask is not None:
            return self.run_stacked(plan, latent, args, kwargs, mask=mask)
        predictions: list[Prediction] = [None] * len(plan)  # type: ignore[list-item]
        template = None
        split = self.rows_are_split()
        calls = self._calls(plan, together=self.members_share_calls(split))
        for group in self._vmapped_groups(plan, calls, len(latent), split):
            outputs = self._vmapped([plan[p].member for p in group], args, kwargs)
            template = outputs[0] if template is None else template
            for position, output in zip(group, outputs):
                predictions[position] = prediction_of(output)
            calls = [c for c in calls if c[0] not in group]
        for positions in calls:
            stacked, output = self.run_stacked([plan[p] for p in positions], latent, args, kwargs)
            template = output if template is None else template
            for position, prediction in zip(positions, stacked):
                predictions[position] = prediction
        return predictions, template

    def _calls(self, plan: list[Evaluation], together: bool) -> list[list[int]]:
        """Group plan positions into denoiser calls: each full member alone; the base and the LoRA members share
        one module, so (when ``together``) they go together."""
        shared = [p for p, evaluation in enumerate(plan) if evaluation.member not in self.full_members]
        full = [[p] for p, evaluation in enumerate(plan) if evaluation.member in self.full_members]
        if not shared:
            return full
        return ([shared] if together else [[p] for p in shared]) + full

    def _vmapped_groups(self, plan: list[Evaluation], calls: list[list[int]], batch: int, split: bool) -> list:
        """Groups of at least two full members on all rows whose vmapped call fits ``max_batch_size``."""
        if not self.vmap_full_members or split or self.caches.active:
            return []
        vmapped = [c[0] for c in calls if plan[c[0]].member in self.full_members and plan[c[0]].rows is None]
        cap = self.rows_per_call(batch)
        per_call = len(vmapped) if cap is None else cap // batch  # members whose rows fit in one call
        if per_call < 2:
            return []
        groups = (vmapped[start : start + per_call] for start in range(0, len(vmapped), per_call))
        return [group for group in groups if len(group) > 1]  # alone, a member is called on its own

    def members_share_calls(self, split: bool | None = None) -> bool:
        """Whether members' rows may share a denoiser call now: ``batch_members``, unless an attention processor
        of the base splits a call's rows into parts of its own (:func:`~diffusion_blend.checks.splits_its_rows`,
        perturbed-attention guidance: pipelines install those processors for the duration of their call), or the
        base reshapes its batch inside (:class:`~diffusion_blend.adapters.RowsReshaped`, found at the first call
        that stacks rows of several adapters). Then each member is called on the pipeline's own rows, as the
        pipeline calls a single model. (``split``: :meth:`rows_are_split`, where the caller has read it.)"""
        if split is None:
            split = self.rows_are_split()
        return self.batch_members and not self.rows_reshaped and not split

    def rows_are_split(self) -> bool:
        return any(map(splits_its_rows, {type(layer.processor) for layer in self.attention_layers[NO_ADAPTER]}))

    def rows_per_call(self, batch: int) -> int | None:
        """The cap on rows per denoiser call for a call of ``batch`` rows (None: no cap)."""
        if self.max_batch_size == INPUT_ROWS:
            return batch
        if self.max_batch_size is not None and self.max_batch_size < batch and self.rows_are_split():
            raise ValueError(
                f"max_batch_size={self.max_batch_size} would split the pipeline's call of {batch} rows, which the "
                "denoiser's perturbed-attention-guidance processors need together: use max_batch_size='input'"
            )
        return self.max_batch_size

    # ------------------------------------------------------------------------------------------------- stacked calls
    def run_stacked(
        self, evaluations: list[Evaluation], latent: Rows, args: tuple, kwargs: dict, mask: torch.Tensor | None = None
    ) -> tuple[list[Prediction], Any]:
        """Evaluations on one module as one batch (rows stacked in plan order), chunked by ``max_batch_size``."""
        batch = len(latent)
        sizes = [batch if e.rows is None else len(e.rows) for e in evaluations]
        first = evaluations[0].member
        module = self.full_members[first] if first in self.full_members else None
        routes = mask if mask is not None or module is not None else _routes(evaluations, sizes, self.adapter_of)
        total = sum(sizes)
        chunk = self.rows_per_call(batch) or total
        whole_batch = len(evaluations) == 1 and evaluations[0].rows is None and chunk >= batch
        if not whole_batch:  # the batch rows each stacked row takes (none to gather for one evaluation of all rows)
            index = _stacked_rows(evaluations, batch, like(latent).device)
        pieces, template = [], None
        for start in range(0, total, chunk):
            if whole_batch:
                call_args, call_kwargs = args, kwargs
            else:
                call_args, call_kwargs = self.signature.on_rows(
                    self.base, args, kwargs, index[start : start + chunk], batch, isinstance(latent, list)
                )
            chunk_routes = None if routes is None else routes[start : start + chunk]
            call = (tuple(e.member for e in evaluations), tuple(sizes), start)  # its place in the plan
            call_kwargs = self.caches.for_call(call, call_kwargs)
            with self.step_contexts.for_call(module or self.base, call):
                output = self._call(module, chunk_routes, call_args, call_kwargs)
            self.caches.after_call(call, output)
            template = output if template is None else template
            pieces.append(prediction_of(output))
        stacked = joined(pieces) if len(pieces) > 1 else pieces[0]
        return split_rows(stacked, sizes), template

    def _call(
        self, module: nn.Module | None, routes: list[str] | torch.Tensor | None, args: tuple, kwargs: dict
    ) -> Any:
        """One denoiser call: a full member, or the shared base with each row routed to its LoRA adapter (by
        name, or by a rows × adapters mask)."""
        if isinstance(routes, list):
            routes = routes[0] if len(set(routes)) == 1 else routes
        if self.compiled is not None:
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
        """The same call through ``torch.compile``: LoRA routing enters the graph as a mask tensor."""
        if module is not None or self.router is None:
            return self.compiled("module", call_module, module or self.base, args, kwargs)
        latent = self.signature.sample(args, kwargs)
        if not isinstance(routes, torch.Tensor):
            routes = self.router.dense_mask(routes, len(latent), like=like(latent))
        try:
            return self.compiled("routed", call_routed, self.router, routes, self.base, args, kwargs)
        except RowsReshaped as error:  # a compiled call routes every row by the mask, one member's rows too
            raise ValueError(f"{error}; compiled calls route their rows by a mask: use compile=False") from error

    def _vmapped(self, names: list[str], args: tuple, kwargs: dict) -> list[Any]:
        """Full members on the same inputs in one vmapped call over their stacked weights."""
        modules = [self.full_members[name] for name in names]
        stacked = self.stacked_weights.of(names, modules, call_state(modules[0], self.attention_layers[names[0]]))
        inputs = (stacked.template, stacked.params, stacked.buffers, args, kwargs)
        try:
            outputs = (
                call_vmapped(*inputs) if self.compiled is None else self.compiled("vmapped", call_vmapped, *inputs)
            )
        except RuntimeError as error:  # what torch.vmap cannot run: an operation it has no batching rule for (Z-Image
            if isinstance(error, torch.OutOfMemoryError):  # pads sequences), a read of values (HiDream's experts)
                raise
            raise ValueError(
                f"{type(stacked.template).__name__}'s forward cannot be vmapped over its members' weights "
                f"({str(error).strip().splitlines()[0]}): use vmap_full_members=False"
            ) from error
        predictions = prediction_of(outputs)  # every field of the output is stacked over members
        return [with_prediction(outputs, member_of_stacked(predictions, i)) for i in range(len(names))]


def _routes(evaluations: list[Evaluation], sizes: list[int], adapter_of: Mapping[str, str]) -> list[str]:
    """Every stacked row's adapter, evaluations one after another."""
    return [adapter_of.get(e.member, NO_ADAPTER) for e, size in zip(evaluations, sizes) for _ in range(size)]


def _stacked_rows(evaluations: list[Evaluation], batch: int, device: torch.device) -> torch.Tensor:
    """The batch row of every stacked row, evaluations one after another."""
    if all(evaluation.rows is None for evaluation in evaluations):  # a mix blend: the same every step
        return _repeated_batch_rows(len(evaluations), batch, device)
    return torch.cat([e.rows if e.rows is not None else torch.arange(batch, device=device) for e in evaluations])


@functools.lru_cache(maxsize=64)
def _repeated_batch_rows(repeats: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device).repeat(repeats)
