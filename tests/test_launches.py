"""Operations launched per step: on a GPU at batch 1 a denoiser step is bound by the host launching kernels, so a
blend may add work per step (draws, stacking, the weighted sum) but none per LoRA layer. Operations are counted at
the dispatcher (views and other metadata-only operations excluded): the same count on every device."""

from __future__ import annotations

import pytest
import torch

from blend_speed import Launches
from diffusion_blend import BlendedDenoiser
from diffusion_blend.adapters import NO_ADAPTER, AdapterRouter
from helpers import tiny
from helpers.calls import cfg_inputs, lora_base

#: more LoRA layers than tiny.LORA_TARGETS: every attention projection plus the transformer blocks' projections
MORE_TARGETS = [*tiny.LORA_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _plain_step(base, adapter="ir") -> int:
    """Operations of one call of the denoiser with one adapter active (a fine-tuned model, as peft runs it)."""
    sample, t, context = cfg_inputs()
    base.set_adapter([adapter])
    try:
        with torch.no_grad(), Launches() as launches:
            base(sample, t, encoder_hidden_states=context)
    finally:
        base.set_adapter([])
    return launches.count


def _blended_step(base, mode, weights, kl_scale) -> int:
    """Operations of one blended step inside a routing context (as in a pipeline call), after a first step."""
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(0))
    sample, t, context = cfg_inputs()
    with torch.no_grad(), denoiser.routing():
        denoiser(sample, t + 1, encoder_hidden_states=context)
        with Launches() as launches:
            denoiser(sample, t, encoder_hidden_states=context)
    return launches.count


def _lora_layer(base):
    return base.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q


@pytest.mark.parametrize("route", ["ir", ["ir", "ir", "aes", "aes"], "mask"])
def test_a_routed_lora_layer_launches_what_peft_launches_for_its_active_adapter(route):
    """One adapter, two stacked by rows, or a rows × adapters mask (stochastic draws): base + one low-rank product."""
    base = lora_base()
    layer = _lora_layer(base)
    x = torch.randn(4, 16, layer.in_features)
    base.set_adapter(["ir"])
    with torch.no_grad(), Launches() as peft_launches:
        layer(x)
    base.set_adapter([])
    router = AdapterRouter(base, ["ir", "aes"])
    with torch.no_grad(), router:
        routing = router.dense_mask(["ir", "aes", NO_ADAPTER, "ir"], 4, x) if route == "mask" else route
        with router.route(routing):
            layer(x)  # what the layer needs is worked out at its first call of the routing context
            with Launches() as routed_launches:
                layer(x)
    assert routed_launches.count == peft_launches.count


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.5, "aes": 0.5}, 1.0),
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 1.0),
    ],
)
def test_a_blended_step_adds_no_operation_per_lora_layer(mode, weights, kl_scale):
    """What a blended step launches beyond a fine-tuned model's step is the same with 4 or 8 LoRA targets per
    transformer block: the blend's own work is per step, none of it per layer."""
    extra = [
        _blended_step(base, mode, weights, kl_scale) - _plain_step(base)
        for base in (lora_base(), lora_base(targets=MORE_TARGETS))
    ]
    assert extra[0] == extra[1]


@pytest.mark.parametrize(
    "mode, weights, kl_scale, budget",
    [
        ("mix", {"ir": 0.5, "aes": 0.5}, 1.0, 5),  # DB-MPA: gather the stacked rows (sample, context), Σ w·ε
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5, 9),  # DB-MPA with the base: + the members' differences to it, λ·
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 1.0, 22),  # DB-MPA-LS: the draws (hash, sort, match) and their mask
    ],
)
def test_a_blended_step_launches_a_bounded_number_of_operations_of_its_own(mode, weights, kl_scale, budget):
    """The blend's own operations per step, counted with one LoRA layer per transformer block so that the extra
    rows' products (DB-MPA's two members) weigh least: about twenty at most, against the 1,238 of a step of an SD1.5
    UNet with one LoRA active (benchmarks/blend_speed.py's launches_* ratios)."""
    targets = ["to_q"]
    base = lora_base(targets=targets)
    extra = _blended_step(base, mode, weights, kl_scale) - _plain_step(base)
    assert extra <= budget
