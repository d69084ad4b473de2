"""LoRA basis members that share one base module: which adapters it holds, and routing rows of a batch to them.

A LoRA member is evaluated on the shared base, and several members (and the base itself) in one call: each row of
the batch is routed to one adapter by the LoRA layers themselves, whose ``forward`` is replaced while routing (as
accelerate's hooks replace a module's forward) (:class:`AdapterRouter`). Diffusers' denoisers have no per-row
adapter argument in their ``forward``, hence the replacement. The adapters' activation (``set_adapter``) is left as
the user set it, so the pipeline outside a blend behaves as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

#: peft's routing name for "no adapter" in a mixed-adapter batch.
NO_ADAPTER = "__base__"
#: where a LoRA layer holds, while routed, its routers and own forward (:class:`_LayerRouters`), and its routed
#: forward
ROUTER_ATTRIBUTE = "_diffusion_blend_router"
ROUTED_FORWARD_ATTRIBUTE = "_diffusion_blend_forward"
#: routings whose per-layer plans a routing context keeps (a blend uses a few; stochastic draws make new ones)
MAX_PLANNED_ROUTINGS = 16


class RowsReshaped(ValueError):
    """A routed LoRA layer met another number of rows than the call it routes: the denoiser reshapes its batch
    inside (Qwen-Image-Edit-2511 doubles its timestep rows; video UNets fold frames into rows), so the rows of a
    call cannot be told apart there, and rows of different adapters cannot share a call."""

    def __init__(self, routed: int, met: int):
        super().__init__(
            f"a routing of {routed} rows met a LoRA layer input with {met} rows: the denoiser reshapes "
            "its batch inside, so its rows cannot be routed to different adapters in one call"
        )


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
        self.layers = {
            id(layer): (list(layer.active_adapters), layer.disable_adapters) for layer in tuner_layers(module)
        }
        self.model_active = next(iter(self.layers.values()))[0] if self.layers else []
        self.requires_grad = {id(p): p.requires_grad for p in module.parameters()}

    def restore(self) -> None:
        for layer in tuner_layers(self.module):
            active, disabled = self.layers.get(id(layer), (self.model_active, False))
            layer.set_adapter(active)
            if disabled:
                layer.enable_adapters(False)
        self.restore_requires_grad()

    def restore_requires_grad(self) -> None:
        """Undo what peft's ``set_adapter`` does beside activating: it makes the active adapters trainable."""
        for parameter in self.module.parameters():
            parameter.requires_grad_(self.requires_grad.get(id(parameter), False))


class AdapterRouter:
    """Sends each row of a batch through one LoRA adapter of ``module`` (or none) during forward calls.

    Use ``with router:`` around one or many forward calls (it checks the adapters' state and replaces the forward
    of the LoRA layers holding the routed adapters, restoring it on exit), and ``with router.route(names):``
    around each call, where ``names`` is one adapter name for the whole batch or one name per row.

    The base layer runs once on all rows (what peft's forward computes with no adapter active, without its per-call
    bookkeeping); the routed forward then adds each adapter's update
    ``lora_B(lora_A(dropout(x))) · scaling`` — peft's own vanilla-LoRA update, computed by the layer's own
    modules — to that adapter's rows. Rows are grouped contiguously per adapter by the caller, so every group is a
    slice (a view), never a gather: this is what keeps a stacked call at the cost of its FLOPs. (peft's
    ``adapter_names`` mixed batches give the same numbers but build per-row index lists and gather/scatter
    copies in every layer; on small models that overhead is larger than the calls it saves.)

    A routing can also be a tensor: a (rows × adapters) 0/1 mask, :attr:`row_mask`, that every layer
    multiplies into one stacked low-rank product over all rows. The stochastic mode builds it from its draws on the
    GPU without reading them back (row slices would need their sizes on the host), and compiled calls always use
    it: the layers' code is then the same at every call and only the mask's values change, so a graph is reused for
    any routing of the same number of rows.

    What a layer needs — which routed adapters it holds, their stacked weights, its rows' masks — is worked out
    once and kept, so a denoising step costs each layer a dictionary lookup and four tensor operations (on a GPU the
    Python per layer is what a small batch waits for). It is kept across routing contexts (the outermost
    ``with router:``, one pipeline call) while the layer's fingerprint is unchanged: at the layer's first call in a
    context, its adapters' modules, weights (storage and version), scalings, dropouts and hooks are compared with
    those it was worked out from, which costs a fraction of working it out again. Adapter weights changed without
    gradients are seen from the next context on.

    Diffusers' LoRA scale (``cross_attention_kwargs={"scale": s}``) reaches only *active* adapters (peft's
    ``scale_layer``), and routed adapters are inactive; :meth:`scaled` applies it to every routed update instead.
    """

    def __init__(self, module: nn.Module, adapters: Sequence[str]):
        self.module = module
        self.order = list(dict.fromkeys(adapters))  # the adapters' columns in a row mask
        self.adapters = set(adapters)
        self.row_mask: torch.Tensor | None = None
        self.lora_scale = 1.0  # what every routed update is multiplied by (:meth:`scaled`)
        self._rank_masks = _RankMasks(None, {})
        self._suspended: list[tuple[nn.Module, object]] = []
        self._last_mask: tuple[tuple, torch.Tensor] | None = None
        self._member_rows: tuple[tuple, torch.Tensor] | None = None
        self._capture_layers()
        self._segments: tuple[tuple[str, int, int], ...] | None = None
        # Kept across routing contexts while a layer's fingerprint is unchanged (:class:`_LayerState`):
        self._states: dict[int, _LayerState] = {}  # layer → what it needs
        # Worked out once per routing context (the outermost `with router:`, e.g. one pipeline call), so that the
        # hot path of a layer is a dictionary lookup and its four tensor operations:
        self._layer_routings: dict[int, _LayerRouting] = {}  # layer → its routing, checked in this context
        self._read_weights: dict[tuple, tuple] = {}  # (layer, adapters) → stacked weights, read in this context
        self._masks: dict[tuple, torch.Tensor] = {}  # row × rank-block masks, shared by layers of equal ranks
        self._plans_by_routing: dict[tuple, _RoutingPlans] = {}  # segments → the plans made for them
        self._plans: dict[tuple, _SegmentPlan | None] = {}  # (layer, rows, ndim) → its plan in the current routing
        self._shared_plans: dict[tuple, _SharedPlan] = {}  # what layers of equal adapters and ranks share in it
        self._depth = 0
        self._snapshot: ActivationSnapshot | None = None

    def _adapter_inventory(self) -> frozenset | None:
        """The adapter names the module declares (diffusers and peft keep ``peft_config``): a cheap sign that
        adapters were loaded, deleted or unloaded since the layers were captured. None: unknown, walk again."""
        config = getattr(self.module, "peft_config", None)
        return frozenset(config) if isinstance(config, Mapping) else None

    def _capture_layers(self) -> None:
        """Find the LoRA layers now in the module (adapters may have been loaded or unloaded since), and check
        that every routed adapter is still there and routable."""
        self._inventory = self._adapter_inventory()
        self._states = {}
        self.layers = [layer for layer in tuner_layers(self.module) if _layer_adapters(layer) & self.adapters]
        missing = self.adapters - set().union(*(_layer_adapters(layer) for layer in self.layers))
        if missing:
            raise ValueError(
                f"LoRA adapter(s) {', '.join(sorted(map(repr, missing)))} are no longer loaded on the denoiser "
                "(unloaded or deleted since the blend was made)"
            )
        for layer in self.layers:
            _check_routable(layer, self.adapters)
        self._enclosing = _enclosing_modules(self.module, self.layers)

    def __enter__(self) -> AdapterRouter:
        if self._depth == 0:
            inventory = self._adapter_inventory()
            if inventory is None or inventory != self._inventory:
                self._capture_layers()
            self._check_state()
            active = [layer for layer in self.layers if not self.adapters.isdisjoint(layer.active_adapters)]
            if active:  # basis adapters left active (e.g. by peft's loader): off while routing, restored on exit
                self._snapshot = ActivationSnapshot(self.module)
                for layer in active:
                    layer.set_adapter([a for a in layer.active_adapters if a not in self.adapters])
                self._snapshot.restore_requires_grad()
            self._suspend_compiled_regions()
            self._forget_context()
            for layer in self.layers:
                _install_router(layer, self)
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0:
            for layer in self.layers:
                _remove_router(layer, self)
            self.row_mask = None
            self._forget_context()
            for module, compiled in self._suspended:
                module._compiled_call_impl = compiled
            self._suspended = []
            if self._snapshot is not None:
                self._snapshot.restore()
                self._snapshot = None

    def _forget_context(self) -> None:
        """Drop what was worked out during a routing context: the next one checks the layers and weights anew."""
        self._layer_routings, self._read_weights, self._masks, self._plans_by_routing = {}, {}, {}, {}
        self._rank_masks = _RankMasks(None, {})

    def _suspend_compiled_regions(self) -> None:
        """Run the user's in-place compiled regions (``module.compile()``, diffusers' ``compile_repeated_blocks``)
        that contain routed layers uncompiled while routing: their graphs were traced without the routing, and
        retracing them with it would bake each routing's Python state into a graph of the user's options."""
        for module in self._enclosing:
            compiled = getattr(module, "_compiled_call_impl", None)
            if compiled is not None:
                self._suspended.append((module, compiled))
                module._compiled_call_impl = None

    @contextlib.contextmanager
    def route(self, names: str | list[str] | torch.Tensor) -> Iterator[None]:
        """Route the forward calls made inside the block: one adapter (or ``NO_ADAPTER``), one per row, or a
        rows × adapters mask (:meth:`member_mask`, :meth:`dense_mask`)."""
        if self._depth == 0:
            raise RuntimeError("AdapterRouter.route() must be used inside `with router:`")
        previous = self._segments, self.row_mask, self._plans, self._shared_plans
        if isinstance(names, torch.Tensor):
            self._segments, self.row_mask = None, names
        else:
            self._segments, self.row_mask = _segments(names), None
            if len(self._plans_by_routing) >= MAX_PLANNED_ROUTINGS:  # routings that change every call (draws)
                self._plans_by_routing, self._masks = {}, {}
            # the layers' plans for this routing, kept for the context: a mix blend routes every step alike
            plans = self._plans_by_routing.setdefault(self._segments, _RoutingPlans({}, {}))
            self._plans, self._shared_plans = plans.layers, plans.shared
        try:
            yield
        finally:
            self._segments, self.row_mask, self._plans, self._shared_plans = previous

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Multiply every routed adapter's update by ``scale`` inside the block, as diffusers' LoRA scale
        multiplies an active adapter's (``scale_layer``: the scaling ``lora_alpha / r`` times ``scale``)."""
        previous, self.lora_scale = self.lora_scale, scale
        try:
            yield
        finally:
            self.lora_scale = previous

    def member_mask(self, adapters: list[str | None], drawn: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The mask routing row i through ``adapters[drawn[i]]`` (None: no adapter, the base), built on ``drawn``'s
        device (no host read)."""
        key = (tuple(adapters), drawn.device, like.dtype)
        if self._member_rows is None or self._member_rows[0] != key:  # each member's row of the mask, made once
            columns = torch.tensor([-1 if adapter is None else self.order.index(adapter) for adapter in adapters])
            self._member_rows = (key, self._one_hot(columns.to(drawn.device, non_blocking=True), like.dtype))
        return self._member_rows[1][drawn]

    def dense_mask(self, names: str | list[str], rows: int, like: torch.Tensor) -> torch.Tensor:
        """The dense routing of ``rows`` rows (one name for all, or one per row): rows × adapters, 1 where a row
        goes through that adapter; in ``like``'s dtype and device. The last mask is reused (a mix blend routes
        every step alike)."""
        key = (names if isinstance(names, str) else tuple(names), rows, like.dtype, like.device)
        if self._last_mask is not None and self._last_mask[0] == key:
            return self._last_mask[1]
        per_row = [names] * rows if isinstance(names, str) else names
        columns = torch.tensor([-1 if name == NO_ADAPTER else self.order.index(name) for name in per_row])
        mask = self._one_hot(columns.to(like.device, non_blocking=True), like.dtype)
        self._last_mask = (key, mask)
        return mask

    def _one_hot(self, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows × adapters: 1 in each row's column (none for -1, the base), made where ``columns`` lives."""
        every = torch.arange(len(self.order), device=columns.device)
        return (columns.unsqueeze(1) == every).to(dtype)

    def _add_updates(self, layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        """The updates of the adapters a layer's rows are routed to, added to its base output (None: none)."""
        if self.row_mask is not None:
            x = args[0] if args else next(iter(kwargs.values()))
            return self._add_masked_updates(layer, self._routing_of(layer), x, output)
        if self._segments is None:
            return None
        return self._add_segment_updates(layer, args[0] if args else next(iter(kwargs.values())), output)

    def _routing_of(self, layer: nn.Module) -> _LayerRouting:
        """The routed adapters ``layer`` holds and how it applies them (checked once per routing context)."""
        if torch.compiler.is_compiling():  # traced: worked out at trace time, the graph holds only tensor work
            return _layer_routing(layer, self.order)
        return self._state_of(layer).routing

    def _state_of(self, layer: nn.Module) -> _LayerState:
        """What ``layer`` needs: kept from earlier routing contexts where its fingerprint is unchanged, else worked
        out anew (compared at its first call in each context)."""
        state = self._states.get(id(layer))
        if id(layer) not in self._layer_routings:  # its first call in this context
            fingerprint = _fingerprint(layer, self.order)
            if state is None or state.fingerprint != fingerprint:
                state = self._states[id(layer)] = _LayerState(fingerprint, _layer_routing(layer, self.order), {}, {})
            self._layer_routings[id(layer)] = state.routing
        return state

    def _add_masked_updates(
        self, layer: nn.Module, routing: _LayerRouting, x: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        """Mask routing (see the class): the same tensor operations whatever the rows' adapters are."""
        row_mask = self.row_mask
        if x.shape[0] != row_mask.shape[0]:
            raise RowsReshaped(row_mask.shape[0], x.shape[0])
        if not _stacks(routing):
            updates = [
                (column, lora_update(layer, a, x, self.lora_scale))
                for a, (column, _) in zip(routing.adapters, routing.layout)
            ]
            update = sum(_broadcast(row_mask[:, column].to(u.dtype), output.ndim) * u for column, u in updates)
            return output + update.to(output.dtype)
        if torch.compiler.is_compiling():  # traced into the graph: the compiler folds or fuses it
            stacked_a, stacked_b = _stack(layer, routing.adapters, self.lora_scale)
            rank_mask = _rank_mask(row_mask, routing.layout)
        else:
            stacked_a, stacked_b = self._stacked_weights(layer, routing, routing.adapters)
            if self._rank_masks.row_mask is not row_mask:  # a new routing (holding the mask keeps its identity unique)
                self._rank_masks = _RankMasks(row_mask, {})
            rank_mask = self._rank_masks.by_layout.get(routing.layout)
            if rank_mask is None:  # shared by every layer of the same ranks during this routing
                rank_mask = self._rank_masks.by_layout[routing.layout] = _rank_mask(row_mask, routing.layout)
        low_rank = _apply(routing.first_a, x.to(stacked_a.dtype), stacked_a)
        update = _apply(
            routing.first_b, low_rank * _on_rank_axis(rank_mask.to(low_rank.dtype), routing, low_rank.ndim), stacked_b
        )
        return output + update.to(output.dtype)

    def _add_segment_updates(self, layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """Row-segment routing: each adapter's update added to its own slice of rows. The hot path of a routed
        layer (every layer, every step): one lookup of the layer's plan, then its four tensor operations."""
        key = (id(layer), x.shape[0], x.ndim)  # (a tensor's len() goes through Python)
        plan = self._plans.get(key, _UNPLANNED)
        if plan is _UNPLANNED:
            plan = self._plans[key] = self._plan_of(layer, x.shape[0], x.ndim)
        if plan is None:
            return None
        routing, start, stop = plan.routing, plan.start, plan.stop
        if plan.mask is not None and not (routing.dropouts and _dropping(routing)):
            update = self._stacked_update(layer, routing, x[start:stop], plan)  # the rows from the first to the last
            if update.dtype != output.dtype:  # adapted, in one product
                update = update.to(output.dtype)
            if torch.is_grad_enabled():
                return torch.cat([output[:start], output[start:stop] + update, output[stop:]])
            output[start:stop].add_(update)  # (`+=` would copy the slice back)
            return output
        if torch.is_grad_enabled():
            output = output.clone()  # the in-place row updates below must not touch a tensor autograd saved
        for adapter, first, last in plan.segments:  # (relative to the plan's first row)
            rows = slice(start + first, start + last)
            update = lora_update(layer, adapter, x[rows], self.lora_scale)
            output[rows].add_(update.to(output.dtype))
        return output

    def _plan_of(self, layer: nn.Module, rows: int, ndim: int) -> _SegmentPlan | None:
        """The layer's plan for the current routing, kept in its state across routing contexts."""
        if torch.compiler.is_compiling():
            return self._plan_segments(layer, self._routing_of(layer), rows, ndim)
        state = self._state_of(layer)
        plans, key = state.plans, (self._segments, rows, ndim)
        plan = plans.get(key, _UNPLANNED)
        if plan is _UNPLANNED:
            if len(plans) >= MAX_PLANNED_ROUTINGS:  # routings that change every call (draws)
                plans.clear()
            plan = plans[key] = self._plan_segments(layer, state.routing, rows, ndim)
        return plan

    def _plan_segments(self, layer: nn.Module, routing: _LayerRouting, rows: int, ndim: int) -> _SegmentPlan | None:
        """A layer's share of the current routing for inputs of ``rows`` rows and ``ndim`` dimensions (None when
        none of its rows is routed to an adapter it holds)."""
        segments = [segment for segment in self._segments_for(rows) if segment[0] in routing.adapters]
        if not segments:
            return None
        like = _weight(routing.factors[segments[0][0]][0])
        key = (
            routing.adapters,
            routing.layout,
            routing.stackable,
            routing.rank_axis,
            rows,
            ndim,
            like.dtype,
            like.device,
        )
        shared = self._shared_plans.get(key)  # what layers of the same adapters, ranks and inputs share
        if shared is None:
            shared = self._shared_plans[key] = self._shared_plan(routing, segments, rows, ndim, like)
        return _SegmentPlan(routing, *shared)

    def _shared_plan(
        self, routing: _LayerRouting, segments: list, rows: int, ndim: int, like: torch.Tensor
    ) -> _SharedPlan:
        """What every layer of the same adapters, ranks and inputs shares of its :class:`_SegmentPlan`."""
        adapters = tuple(dict.fromkeys(adapter for adapter, _, _ in segments))
        if len(segments) == 1 or not routing.stackable:
            return _SharedPlan(tuple(segments), 0, rows, None, adapters)
        start, stop = segments[0][1], segments[-1][2]
        shifted = tuple((adapter, first - start, last - start) for adapter, first, last in segments)
        ranks = dict(zip(routing.adapters, (rank for _, rank in routing.layout)))
        blocks = _rank_blocks(adapters, [ranks[adapter] for adapter in adapters])
        mask = self._mask(shifted, blocks, stop - start, like)
        return _SharedPlan(shifted, start, stop, _on_rank_axis(mask, routing, ndim), adapters)

    def _stacked_update(
        self, layer: nn.Module, routing: _LayerRouting, x: torch.Tensor, plan: _SegmentPlan
    ) -> torch.Tensor:
        """Every adapter's update in one low-rank product: ((x·A_catᵀ) ⊙ M)·(B·s)_catᵀ, M keeping for each row
        only the rank block of its own adapter. Four operations per layer, as for one active adapter."""
        stacked_a, stacked_b = self._stacked_weights(layer, routing, plan.adapters)
        if x.dtype != stacked_a.dtype:
            x = x.to(stacked_a.dtype)
        return _apply(routing.first_b, _apply(routing.first_a, x, stacked_a) * plan.mask, stacked_b)

    def _stacked_weights(
        self, layer: nn.Module, routing: _LayerRouting, adapters: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' stacked weights (:func:`_stack`), kept in the layer's state while its weights are unchanged
        (its fingerprint holds their storage and version); built afresh, with their autograd graph, when gradients
        must reach them. Without gradients the weights are read once per routing context: change them between
        pipeline calls, not inside one."""
        grad, scale = torch.is_grad_enabled(), self.lora_scale
        if not grad and (read := self._read_weights.get((id(layer), adapters, scale))) is not None:
            return read
        state = self._state_of(layer)
        if grad and any(_weight(factor).requires_grad for a in adapters for factor in routing.factors[a]):
            self._read_weights = {}  # trained inside this context: read them anew after every such call
            state.stacked.clear()
            return _stack(layer, adapters, scale)
        kept = state.stacked.get(adapters)
        if kept is None or kept.scale != scale:
            with torch.no_grad():
                kept = state.stacked[adapters] = _StackedFactors(scale, *_stack(layer, adapters, scale))
        weights = self._read_weights[(id(layer), adapters, scale)] = (kept.a, kept.b)
        return weights

    def _mask(self, segments: list, blocks: dict, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Rows × total rank, 1 where a row's adapter owns the rank block; shared by all layers of equal ranks."""
        key = (tuple(segments), tuple(blocks.items()), rows, like.dtype, like.device)
        mask = self._masks.get(key)
        if mask is None:  # kept for the routing context: a mix blend routes every step alike
            mask = torch.zeros(rows, max(stop for _, stop in blocks.values()), dtype=like.dtype, device=like.device)
            for adapter, start, stop in segments:
                mask[start:stop, slice(*blocks[adapter])] = 1
            self._masks[key] = mask
        return mask

    def _segments_for(self, rows: int) -> tuple[tuple[str, int, int], ...]:
        segments = self._segments
        if segments[-1][2] == rows:
            return segments
        if len(segments) == 1:  # one adapter for all rows: any layout of the rows inside the layer is fine
            return ((segments[0][0], 0, rows),)
        raise RowsReshaped(segments[-1][2], rows)

    def _check_state(self) -> None:
        """Members fused into the weights would reach every row. (Other adapters, fused or active, belong to the
        base: every row gets them, as in the pipeline outside a blend.)"""
        merged = set().union(*(layer.merged_adapters for layer in self.layers)) & self.adapters
        if merged:
            raise ValueError(
                f"LoRA member(s) {', '.join(sorted(map(repr, merged)))} are fused (merged) into the denoiser's "
                "weights, so every row would carry them; unfuse them first (pipe.unfuse_lora())"
            )


def _segments(names: str | list[str]) -> tuple[tuple[str, int, int], ...]:
    """Run-length encoding of a routing: ``["a", "a", "b"]`` → ``(("a", 0, 2), ("b", 2, 3))``; a single name is
    one open segment that any number of rows fills."""
    if isinstance(names, str):
        return ((names, 0, -1),)
    segments: list[tuple[str, int, int]] = []
    for row, name in enumerate(names):
        if segments and segments[-1][0] == name:
            segments[-1] = (name, segments[-1][1], row + 1)
        else:
            segments.append((name, row, row + 1))
    return tuple(segments)


class _LayerRouters:
    """What a routed LoRA layer holds while routed: the forward of its own it had (an accelerate hook's, say; None:
    its class's) and the routers routing it — several when blends on one base are nested. A copy or pickle of the
    layer made meanwhile gets none of the routers: the copy then runs its own forward as if never routed."""

    def __init__(self, own_forward: Any = None, routers: list | None = None):
        self.own_forward = own_forward
        self.routers = routers if routers is not None else []

    def __reduce__(self):
        return _LayerRouters, (self.own_forward,)


def _install_router(layer: nn.Module, router: AdapterRouter) -> None:
    attributes = layer.__dict__  # (what nn.Module.__setattr__ does with a function, without its type checks)
    routed = attributes.get(ROUTER_ATTRIBUTE)
    if routed is None:
        routed = attributes[ROUTER_ATTRIBUTE] = _LayerRouters(attributes.get("forward"))
        attributes["forward"] = _routed_forward_of(layer)
    routed.routers.append(router)


def _remove_router(layer: nn.Module, router: AdapterRouter) -> None:
    """Undo :func:`_install_router`; the last router out gives the layer its own forward back."""
    routed = layer.__dict__.get(ROUTER_ATTRIBUTE)
    if routed is None or router not in routed.routers:
        return
    routed.routers.remove(router)
    if not routed.routers:
        attributes = layer.__dict__
        del attributes[ROUTER_ATTRIBUTE]
        if routed.own_forward is None:
            attributes.pop("forward", None)
        else:
            attributes["forward"] = routed.own_forward


def _routed_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A routed LoRA layer's forward while routed: its base layer on all rows — what peft's forward computes with
    no adapter active, without its per-call bookkeeping; peft's forward itself where the user left adapters of
    their own active or fused (they belong to the base) — plus the updates of the rows' adapters, from every router
    routing it (only one has a routing set at a time). A forward of the layer's own still runs, with no member
    active: it gives the base output its way."""
    routed = layer.__dict__[ROUTER_ATTRIBUTE]
    if not routed.routers:  # a copy made while routed: behave as the layer itself
        return (routed.own_forward or functools.partial(type(layer).forward, layer))(*args, **kwargs)
    if routed.own_forward is not None:
        output = routed.own_forward(*args, **kwargs)
    elif layer.merged or (layer.active_adapters and not layer.disable_adapters):
        # the user's own adapters, active or fused, belong to the base: peft applies them (or, disabled, unfuses them)
        output = type(layer).forward(layer, *args, **kwargs)
    else:
        output = layer._modules["base_layer"](*args, **kwargs)
    for router in routed.routers:
        updated = router._add_updates(layer, args, kwargs, output)
        output = output if updated is None else updated
    return output


def _routed_forward_of(layer: nn.Module) -> functools.partial:
    """The layer's routed forward, made once per layer and kept on it: a compiled call guards the forward's
    identity, so every routing context and every router must install the same object for a graph to be reused.
    (Like accelerate's hooks, it makes a reference cycle: a deleted base is freed by the garbage collector.)"""
    forward = layer.__dict__.get(ROUTED_FORWARD_ATTRIBUTE)
    if forward is None:
        forward = layer.__dict__[ROUTED_FORWARD_ATTRIBUTE] = functools.partial(_routed_forward, layer)
    return forward


def _enclosing_modules(module: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """``module`` and every submodule containing one of ``layers`` (the layers included): the regions whose
    in-place compilation would hide the routing. Found once, by the layers' dotted names, so that entering a
    routing looks at these few modules instead of walking the whole denoiser (thousands of modules)."""
    wanted = {id(layer) for layer in layers}
    paths = {""}
    for name, submodule in module.named_modules():
        if id(submodule) in wanted:
            parts = name.split(".")
            paths.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return [module.get_submodule(path) for path in sorted(paths)]


#: a layer's plan not yet worked out in this routing (None is a plan: no update)
_UNPLANNED = object()


class _LayerRouting(NamedTuple):
    """What a LoRA layer needs to add its routed adapters' updates."""

    adapters: tuple[str, ...]  # the routed adapters it holds, in the router's order
    layout: tuple[tuple[int, int], ...]  # (row-mask column, rank) of each, in the same order
    stackable: bool  # whether their updates can be one stacked product (dropout aside): weights readable, same form
    dropouts: tuple[nn.Module, ...]  # their dropouts of p > 0: the product needs them inactive (eval mode)
    first_a: nn.Module  # the first adapter's A and B: their operation (linear or convolution) applies stacked weights
    first_b: nn.Module
    rank_axis: int | None  # where the rank lies in the low-rank activations (None: the last axis)
    factors: dict[str, tuple[nn.Module, nn.Module]]  # each adapter's A and B modules


class _LayerState(NamedTuple):
    """What a routed layer needs, kept across routing contexts while its fingerprint (:func:`_fingerprint`: its
    routed adapters' modules, weights, scalings, dropouts and hooks) is unchanged: compared at the layer's first call
    in each context, any difference makes a new state."""

    fingerprint: tuple
    routing: _LayerRouting
    plans: dict[tuple, _SegmentPlan | None]  # (segments, rows, ndim) → its share of that routing
    stacked: dict[tuple[str, ...], _StackedFactors]  # adapters → their stacked factors at a LoRA scale


class _StackedFactors(NamedTuple):
    """Adapters' factors stacked for one low-rank product (:func:`_stack`) at one LoRA scale."""

    scale: float
    a: torch.Tensor  # A_cat
    b: torch.Tensor  # (B·s)_cat


class _RankMasks(NamedTuple):
    """A mask routing's row × adapter mask expanded to rows × rank blocks, per rank layout (shared by the layers of
    equal ranks while that mask routes)."""

    row_mask: torch.Tensor | None  # the mask they expand (held, so that its identity stays unique)
    by_layout: dict[tuple, torch.Tensor]


class _SharedPlan(NamedTuple):
    """What layers of the same adapters, ranks and inputs share of a row-segment routing (a :class:`_SegmentPlan`
    but its layer's routing)."""

    segments: tuple[tuple[str, int, int], ...]  # (adapter, first row, last row), shifted to start at ``start`` when
    # stacked
    start: int  # the rows from the first to the last adapted one
    stop: int
    mask: torch.Tensor | None  # rows × Σr, shaped to multiply the low-rank activations (None: one update per segment)
    adapters: tuple[str, ...]  # in stacking order


class _RoutingPlans(NamedTuple):
    """The plans made for one routing (kept for the routing context: a mix blend routes every step alike)."""

    layers: dict[tuple, _SegmentPlan | None]  # (layer, rows, ndim) → the layer's plan
    shared: dict[tuple, _SharedPlan]  # (adapters, ranks, rows, ...) → what such layers share


class _SegmentPlan(NamedTuple):
    """A layer's share of a row-segment routing, worked out at its first call in that routing (kept in its
    state)."""

    routing: _LayerRouting
    segments: tuple[tuple[str, int, int], ...]  # (adapter, first row, last row) of its adapters' rows, shifted to
    # start at ``start`` when they are stacked
    start: int  # the rows from the first to the last adapted one
    stop: int
    mask: torch.Tensor | None  # rows × Σr, shaped to multiply the low-rank activations (None: one update per segment)
    adapters: tuple[str, ...]  # in stacking order


def _layer_routing(layer: nn.Module, order: list[str]) -> _LayerRouting:
    modules = layer._modules  # (a submodule looked up through nn.Module's attributes costs several dictionaries')
    lora_a, lora_b = modules["lora_A"]._modules, modules["lora_B"]._modules
    adapters = tuple(adapter for adapter in order if adapter in lora_a)
    factors = {adapter: (lora_a[adapter], lora_b[adapter]) for adapter in adapters}
    layout = tuple((order.index(adapter), _weight(factors[adapter][0]).shape[0]) for adapter in adapters)
    rank_axis = 1 if isinstance(layer, lora.layer._ConvNd) else None
    candidates = (modules["lora_dropout"]._modules[adapter] for adapter in adapters)
    dropouts = tuple(dropout for dropout in candidates if not isinstance(dropout, nn.Identity) and dropout.p > 0)
    stackable = _stackable(layer, adapters) and not any(
        weights_placed_on_call(factor) for pair in factors.values() for factor in pair
    )
    return _LayerRouting(adapters, layout, stackable, dropouts, *factors[adapters[0]], rank_axis, factors)


def _fingerprint(layer: nn.Module, order: list[str]) -> tuple:
    """Everything a layer's state is worked out from that may change between routing contexts (pipeline calls), in
    one flat tuple: for each routed adapter the layer holds, its A, B and dropout modules, the dropout's
    probability, its scaling, the storage, version and rank of its weights (changed in place, moved or replaced), and
    whether a hook places them on call (offloading turned on or off). Modules compare by identity; no tensor is held,
    so comparing two fingerprints reads nothing from a device."""
    modules = layer._modules
    lora_a, lora_b, dropout = (modules[name]._modules for name in ("lora_A", "lora_B", "lora_dropout"))
    scaling, parts = layer.scaling, []
    for adapter in order:
        a = lora_a.get(adapter)
        if a is None:
            continue
        b, drop = lora_b[adapter], dropout[adapter]
        weight_a, weight_b = _weight(a), _weight(b)
        parts += (
            adapter,
            a,
            b,
            drop,
            drop.__dict__.get("p"),
            scaling[adapter],
            weight_a.data_ptr(),
            weight_a._version,
            weight_a.shape[0],
            weight_b.data_ptr(),
            weight_b._version,
            weights_placed_on_call(a),
            weights_placed_on_call(b),
        )
    return tuple(parts)


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, read from its parameters where it is one (a parametrised weight is a property)."""
    weight = module._parameters.get("weight")
    return weight if weight is not None else module.weight


def weights_placed_on_call(module: nn.Module) -> bool:
    """Whether a hook may put the module's weights in place only when it is called (accelerate's sequential CPU
    offload parks them on the meta device between calls; diffusers' leaf-level group offloading moves them): such
    weights cannot be read for a stacked product, the module must be called. A forward left on the instance that is
    just the class's own (what removing accelerate's hooks leaves) and an empty diffusers hook registry do not count."""
    # (read from the instance's own attributes, where accelerate and diffusers put their hooks: a missing attribute
    # looked up through nn.Module.__getattr__ raises inside, and every LoRA factor is checked at every routing context)
    attributes = module.__dict__
    forward = attributes.get("forward")
    replaced = forward is not None and getattr(forward, "__func__", None) is not type(module).forward
    registry = attributes.get("_diffusers_hook")
    return (
        replaced
        or bool(attributes["_forward_pre_hooks"])
        or "_hf_hook" in attributes
        or bool(registry is not None and registry.hooks)
    )


def _stacks(routing: _LayerRouting) -> bool:
    """Whether the layer's updates are one stacked product now (train/eval mode may change between calls)."""
    return routing.stackable and not _dropping(routing)


def _dropping(routing: _LayerRouting) -> bool:
    """Whether a dropout of the layer's routed adapters is active now (train mode)."""
    return any(dropout.training for dropout in routing.dropouts)


def _on_rank_axis(mask: torch.Tensor, routing: _LayerRouting, ndim: int) -> torch.Tensor:
    """A rows × rank mask shaped to multiply low-rank activations of ``ndim`` dimensions (rows first, rank on its
    axis)."""
    shape = [1] * ndim
    shape[0], shape[ndim - 1 if routing.rank_axis is None else routing.rank_axis] = mask.shape
    return mask.view(shape)


def _stack(layer: nn.Module, adapters: tuple[str, ...], lora_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A_cat (Σr × in) and (B·s)_cat (out × Σr): the adapters' factors stacked along the rank, s the adapter's
    scaling times the LoRA scale."""
    return (
        torch.cat([layer.lora_A[a].weight for a in adapters]),
        torch.cat([layer.lora_B[a].weight * (layer.scaling[a] * lora_scale) for a in adapters], dim=1),
    )


def _rank_blocks(adapters: tuple[str, ...], ranks: list[int]) -> dict[str, tuple[int, int]]:
    """Each adapter's block of rows in the stacked A (its rank's share of Σr)."""
    blocks, start = {}, 0
    for adapter, rank in zip(adapters, ranks):
        blocks[adapter] = (start, start + rank)
        start += rank
    return blocks


def lora_update(layer: nn.Module, adapter: str, x: torch.Tensor, lora_scale: float) -> torch.Tensor:
    """peft's vanilla LoRA update of one adapter at a LoRA scale, computed by the layer's own modules."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    low_rank = lora_A(layer.lora_dropout[adapter](x.to(lora_A.weight.dtype)))
    return lora_B(low_rank) * (layer.scaling[adapter] * lora_scale)


def _rank_mask(row_mask: torch.Tensor, layout: list | tuple) -> torch.Tensor:
    """rows × Σr: each adapter's column of the row mask repeated over its rank block; ``layout`` lists
    (column, rank) per adapter in stacking order."""
    return torch.cat([row_mask[:, column].unsqueeze(1).expand(-1, rank) for column, rank in layout], dim=1)


def _broadcast(per_row: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-row factor shaped to multiply a layer output (rows on axis 0)."""
    shape = [1] * ndim
    shape[0] = per_row.shape[0]
    return per_row.view(shape)


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s operation (linear or its convolution) with another weight and no bias."""
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, weight)
    return module._conv_forward(x, weight, None)


def _stackable(layer: nn.Module, adapters: Sequence[str]) -> bool:
    """Whether the adapters' updates can be one stacked product: no bias on B and (for convolutions) identical
    convolution settings. (Their dropouts must be inactive too, which can change from call to call: :func:`_stacks`.)"""
    if any(getattr(layer, "lora_bias", {}).get(a) for a in adapters):
        return False
    if isinstance(layer, lora.layer._ConvNd):
        settings = {
            tuple(getattr(layer.lora_A[a], k) for k in ("kernel_size", "stride", "padding", "dilation", "groups"))
            for a in adapters
        }
        return len(settings) == 1
    return True


def _check_routable(layer: BaseTunerLayer, adapters: set[str]) -> None:
    """Only vanilla LoRA on Linear/Conv layers is routed (its update is lora_B(lora_A(dropout(x))) · scaling)."""
    held = _layer_adapters(layer) & adapters
    if not isinstance(layer, (lora.Linear, lora.layer._ConvNd)):
        raise ValueError(f"LoRA members on {type(layer).__name__} layers cannot be blended yet (only Linear/Conv)")
    variants = sorted(a for a in held if a in getattr(layer, "lora_variant", {}))
    if variants:
        raise ValueError(
            f"LoRA member(s) {', '.join(variants)} use a LoRA variant "
            f"({type(layer.lora_variant[variants[0]]).__name__}, e.g. DoRA) that cannot be blended yet; "
            "fuse it into a full denoiser copy instead"
        )
