"""Rewarded soups (Ramé et al., NeurIPS 2023): one model whose parameters interpolate the basis models'.

For weights w the soup is θ = θ_base + Σ_i w_i (θ_i − θ_base) — with Σ w_i = 1, the average Σ_i w_i θ_i. For LoRA
members θ_i = θ_base + s_i B_i A_i, so each adapted layer adds

    Σ_i w_i s_i B_i A_i x,

which peft computes with the basis adapters active together, each scaled by its w_i (diffusers' ``set_adapters``):
exact, and no update is densified. The method's published implementation instead averaged the A and the B matrices
separately, B̄ = Σ w_i B_i and Ā = Σ w_i A_i; its update s B̄ Ā = s Σ_ij w_i w_j B_i A_j carries cross terms B_i A_j
(i ≠ j) between unrelated adapters and weighs each adapter's own update by w_i² instead of w_i.
``variant="published"`` reproduces it, for comparison, and is labelled so in every result.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import ActivationSnapshot, tuner_layers
from ..blend import validate_weights
from ..pipeline import Blend

VARIANTS = ("updates", "published")
#: the adapter holding the published variant's averaged A and B matrices
PUBLISHED_ADAPTER = "rewarded-soup-published"


class RewardedSoup:
    """A pipeline and basis models, sampled with the soup of the basis models for the weights of each call.

    Args:
        pipe: a diffusers pipeline, as for :class:`~diffusion_blend.Blend`.
        basis: name → basis model (LoRA sources or full denoisers, as for ``Blend``; not both kinds in one soup).
        variant: ``"updates"`` (the exact soup Σ w_i Δ_i) or ``"published"`` (LoRA A and B averaged separately).

    Outside a call the pipeline behaves as before: the basis adapters stay loaded but inactive.
    """

    def __init__(self, pipe: Any, basis: Mapping[str, Any], *, variant: str = "updates", denoiser: str | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"soup variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.variant, self.names = variant, list(basis)
        # the adapters' own names, apart from a Blend's or another soup's of the same basis on this pipeline
        self.adapters = {name: f"soup_{variant}_{name}" for name in basis}
        self.blend = Blend(pipe, {self.adapters[name]: source for name, source in basis.items()}, denoiser=denoiser)
        self.full = {
            name: self.blend.denoiser.modules_by_name[self.adapters[name]]
            for name in self.names
            if self.adapters[name] in self.blend.denoiser.modules_by_name
        }
        if self.full and self.blend.lora_names:
            self.blend.unload()
            loras = sorted(name for name in self.names if name not in self.full)
            raise ValueError(
                f"a soup interpolates members of one kind: {loras} are LoRAs, {sorted(self.full)} full denoisers"
            )
        if variant == "published" and self.full:
            self.blend.unload()
            raise ValueError("the published variant averages LoRA A and B matrices: it needs LoRA members")
        if variant == "published":
            self._add_published_adapter()
        self._full_soup: nn.Module | None = None

    def __call__(self, *args: Any, weights: Mapping[str, float], **pipeline_kwargs: Any) -> Any:
        """Call the pipeline with its denoiser replaced by the soup for ``weights`` (names left out count as 0)."""
        chosen = validate_weights(weights, self.names)
        with self._souped(chosen):
            return self.blend.pipe(*args, **pipeline_kwargs)

    def unload(self) -> None:
        """Remove the basis adapters from the pipeline; the soup is done after."""
        if self.variant == "published":
            self.blend.base.delete_adapters([PUBLISHED_ADAPTER])
        self.blend.unload()

    # ---------------------------------------------------------------------------------------------------- the soups
    def _souped(self, weights: dict[str, float]) -> contextlib.AbstractContextManager:
        if self.full:
            return self._full_parameters(weights)
        if self.variant == "published":
            self._average_published(weights)
            return self._adapters_active([PUBLISHED_ADAPTER], [1.0])
        return self._adapters_active(
            [self.adapters[name] for name in self.names], [weights[name] for name in self.names]
        )

    @contextlib.contextmanager
    def _adapters_active(self, names: list[str], scales: list[float]) -> Iterator[None]:
        """``names`` active together, adapter i's update scaled by ``scales[i]``; afterwards, as before."""
        base = self.blend.base
        snapshot = ActivationSnapshot(base)
        base.set_adapters(names, scales)
        try:
            yield
        finally:
            for layer in tuner_layers(base):
                for name in names:
                    if name in layer.scaling:
                        layer.set_scale(name, 1.0)
            snapshot.restore()

    def _add_published_adapter(self) -> None:
        """An adapter shaped like the members, to hold Ā and B̄; the members must share rank, scale and layers."""
        base = self.blend.base
        configs = [base.peft_config[self.adapters[name]] for name in self.names]
        for name, config in zip(self.names[1:], configs[1:]):
            if _adapter_shape(config) != _adapter_shape(configs[0]):
                self.blend.unload()
                raise ValueError(
                    f"the published variant averages A and B matrices, so its members need one rank, "
                    f"alpha and set of layers: {self.names[0]!r} has {_adapter_shape(configs[0])}, "
                    f"{name!r} has {_adapter_shape(config)}"
                )
        snapshot = ActivationSnapshot(base)
        base.add_adapter(copy.deepcopy(configs[0]), adapter_name=PUBLISHED_ADAPTER)
        snapshot.restore()

    @torch.no_grad()
    def _average_published(self, weights: dict[str, float]) -> None:
        for layer in tuner_layers(self.blend.base):
            if PUBLISHED_ADAPTER not in layer.lora_A:
                continue
            for matrices in (layer.lora_A, layer.lora_B):
                average = sum(weights[name] * matrices[self.adapters[name]].weight for name in self.names)
                matrices[PUBLISHED_ADAPTER].weight.copy_(average)

    @contextlib.contextmanager
    def _full_parameters(self, weights: dict[str, float]) -> Iterator[None]:
        """The pipeline's denoiser swapped for a module holding θ_base + Σ w_i (θ_i − θ_base)."""
        base = self.blend.base
        if self._full_soup is None:
            self._full_soup = copy.deepcopy(base).requires_grad_(False)
        interpolate_parameters(self._full_soup, base, self.full, weights)
        name = self.blend.denoiser_name
        held = getattr(self.blend.pipe, name)
        setattr(self.blend.pipe, name, self._full_soup)
        try:
            yield
        finally:
            setattr(self.blend.pipe, name, held)


@torch.no_grad()
def interpolate_parameters(
    into: nn.Module, base: nn.Module, members: Mapping[str, nn.Module], weights: Mapping[str, float]
) -> nn.Module:
    """Set ``into``'s floating-point tensors to θ_base + Σ_i w_i (θ_i − θ_base) (modules of one architecture)."""
    states = {name: member.state_dict() for name, member in members.items()}
    soup = into.state_dict()  # views of its tensors
    for key, value in base.state_dict().items():
        if value.is_floating_point():
            update = sum(weights[name] * (states[name][key].to(value) - value) for name in members)
            soup[key].copy_(value + update)
    return into


def _adapter_shape(config) -> tuple:
    return (
        config.r,
        config.lora_alpha,
        sorted(config.target_modules),
        dict(config.rank_pattern),
        dict(config.alpha_pattern),
    )
