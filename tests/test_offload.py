"""Blends on offloaded denoisers: weights that hooks put in place only when their module is called (accelerate's
sequential CPU offload: what ``pipe.enable_sequential_cpu_offload`` applies to the UNet; diffusers' layerwise
casting, which stores weights in float8 and casts them up at each call) must be used through those calls. The
hooks' logic runs on a CPU too (execution device = CPU, weights parked on the meta device between calls). The
pipeline method itself cannot be tested here: with ``device="cpu"`` accelerate 1.15 fails on the plain pipeline (it
parks a weight it restored as a plain tensor)."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_submodules

from diffusion_blend import Blend, BlendedDenoiser
from helpers import tiny
from helpers.calls import call_kwargs, cfg_inputs, denoise, lora_base, max_diff, with_lora

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 0.5),
    ],
)
def test_lora_blend_on_a_sequentially_offloaded_base_equals_the_blend_in_memory(mode, weights, kl_scale):
    expected = denoise(BlendedDenoiser(lora_base(), {"ir": "ir", "aes": "aes"}), weights, kl_scale, mode)
    base = lora_base()
    cpu_offload(base, execution_device=CPU)
    assert base.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.lora_A["ir"].weight.is_meta
    blended = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), weights, kl_scale, mode)
    assert max_diff(blended, expected) <= 1e-6


def test_full_members_offloaded_with_the_base_equal_the_blend_in_memory():
    """Each module's own call puts its weights in place: one call per member works offloaded."""
    expected = denoise(BlendedDenoiser(tiny.unet(0), {"ft": tiny.unet(7)}), {"ft": 0.5}, 1.5)
    base, member = tiny.unet(0), tiny.unet(7)
    for module in (base, member):
        cpu_offload(module, execution_device=CPU)
    assert max_diff(denoise(BlendedDenoiser(base, {"ft": member}), {"ft": 0.5}, 1.5), expected) <= 1e-6


@pytest.mark.parametrize("offloaded", ["base", "member"])
def test_full_members_offloaded_apart_from_the_base_raise(offloaded):
    base, member = tiny.unet(0), tiny.unet(7)
    cpu_offload(base if offloaded == "base" else member, execution_device=CPU)
    with pytest.raises(ValueError, match="is offloaded.*offload the base and every full member alike"):
        denoise(BlendedDenoiser(base, {"ft": member}), {"ft": 0.5}, 1.5)


def test_vmapped_offloaded_full_members_raise():
    base, members = tiny.unet(0), {"a": tiny.unet(7), "b": tiny.unet(8)}
    for module in (base, *members.values()):
        cpu_offload(module, execution_device=CPU)
    with pytest.raises(ValueError, match="is offloaded.*use vmap_full_members=False"):
        denoise(BlendedDenoiser(base, members, vmap_full_members=True), {"a": 0.3, "b": 0.5}, 1.5)


def test_lora_layers_stack_again_once_the_offload_hooks_are_removed():
    """Removing accelerate's hooks (which puts the weights back) leaves the class's forward on each module: not a
    hook, so the stacked product (fewer operations) is used again."""
    base = lora_base()
    cpu_offload(base, execution_device=CPU)
    remove_hook_from_submodules(base)
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    sample, t, context = cfg_inputs()
    with torch.no_grad(), denoiser.routing():
        denoiser(sample, t, encoder_hidden_states=context)
        routings = list(denoiser.router._layer_routings.values())
    assert len(routings) == 32 and all(routing.stackable for routing in routings)


def _layerwise_cast(pipe):
    """diffusers' layerwise casting: weights stored in float8, cast up by a hook at each layer's call (the LoRA
    layers' base layers; their adapters stay as loaded)."""
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return pipe


def test_layerwise_cast_blend_one_hot_equals_the_pipeline_with_that_lora(sd_loras):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    _layerwise_cast(pipe)
    assert (
        pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight.dtype
        == torch.float8_e4m3fn
    )
    out = blend.blend(weights={"aes": 1.0}, **call_kwargs()).images
    plain = _layerwise_cast(with_lora(tiny.sd_pipeline(), sd_loras["aes"]))(**call_kwargs()).images
    assert max_diff(out, plain) <= 1e-5


def test_layerwise_cast_stacked_members_equal_separate_calls(sd_loras):
    """A routed layer's base output comes through its base layer's casting hook."""
    blends = []
    for batch_members in (True, False):
        pipe = tiny.sd_pipeline()
        blends.append(Blend(pipe, sd_loras, batch_members=batch_members))
        _layerwise_cast(pipe)
    stacked, separate = (
        blend.blend(weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4, **call_kwargs()).images for blend in blends
    )
    assert max_diff(stacked, separate) <= 1e-5
