"""The LoRA scale (diffusers' ``cross_attention_kwargs={"scale": s}``, SD3's ``joint_attention_kwargs``) reaches
every LoRA member of a blend as diffusers applies it to an active adapter: the member's update times s."""

from __future__ import annotations

import pytest
import torch

from diffusion_blend import Blend, BlendedDenoiser
from helpers import references, tiny
from helpers.calls import call_kwargs, cfg_inputs, denoise, lora_base, max_diff, with_lora

SCALE = 0.5
MEMBERS = {"ir": "ir", "aes": "aes"}


def _diffusers_scaled_blend(base, weights, kl_scale, scale):
    """The blend of diffusers' own calls at that scale: each member's adapter active in turn, the base with none."""
    sample, t, context = cfg_inputs()
    predictions = {}
    with torch.no_grad():
        for name in ("base", *weights):
            base.set_adapter([] if name == "base" else name)
            predictions[name] = base(
                sample, t, encoder_hidden_states=context, cross_attention_kwargs={"scale": scale}
            ).sample
    base.set_adapter([])
    return references.expanded_blend(predictions, weights, kl_scale)


@pytest.mark.parametrize(
    "mode, weights, kl_scale, batch_members",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5, True),  # one stacked call
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5, False),  # one call per member
        ("stochastic", {"ir": 1.0, "aes": 0.0}, 1.0, True),  # routed by a mask; every row draws "ir"
        ("stochastic", {"ir": 1.0, "aes": 0.0}, 0.5, True),
    ],
)
def test_lora_scale_scales_every_lora_member_as_diffusers_does(mode, weights, kl_scale, batch_members):
    base = lora_base()
    blended = denoise(
        BlendedDenoiser(base, MEMBERS, batch_members=batch_members),
        weights,
        kl_scale,
        mode,
        cross_attention_kwargs={"scale": SCALE},
    )
    expected = _diffusers_scaled_blend(base, {n: w for n, w in weights.items() if w}, kl_scale, SCALE)
    assert max_diff(blended, expected) <= 1e-5
    assert (
        max_diff(expected, _diffusers_scaled_blend(base, {n: w for n, w in weights.items() if w}, kl_scale, 1.0)) > 1e-3
    )


def test_a_blend_without_a_scale_is_unscaled_after_one_with_a_scale():
    base = lora_base()
    denoiser = BlendedDenoiser(base, MEMBERS)
    weights = {"ir": 0.3, "aes": 0.7}
    with denoiser.routing():  # one routing context, as in a pipeline call: stacked weights are kept across calls
        denoise(denoiser, weights, 1.0, "mix", cross_attention_kwargs={"scale": SCALE})
        unscaled = denoise(denoiser, weights, 1.0, "mix", cross_attention_kwargs=None)
    assert max_diff(unscaled, _diffusers_scaled_blend(base, weights, 1.0, 1.0)) <= 1e-5


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_a_lora_scale_that_is_not_a_finite_number_is_refused(scale):
    denoiser = BlendedDenoiser(lora_base(), MEMBERS)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\] \(the LoRA scale\) must be a finite"):
        denoise(denoiser, {"ir": 0.3, "aes": 0.7}, 1.0, "mix", cross_attention_kwargs={"scale": scale})


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd_one_hot_at_a_lora_scale_reproduces_the_pipeline_with_that_lora(sd_loras, guidance):
    scaled = call_kwargs(guidance=guidance, cross_attention_kwargs={"scale": SCALE})
    out = Blend(tiny.sd_pipeline(), sd_loras).blend(weights={"aes": 1.0}, **scaled).images
    plain = with_lora(tiny.sd_pipeline(), sd_loras["aes"])(
        **call_kwargs(guidance=guidance, cross_attention_kwargs={"scale": SCALE})
    )
    assert max_diff(out, plain.images) <= 1e-5


def test_sd3_one_hot_at_a_lora_scale_reproduces_the_pipeline_with_that_lora(sd3_loras):
    out = (
        Blend(tiny.sd3_pipeline(), sd3_loras)
        .blend(weights={"aes": 1.0}, **call_kwargs(joint_attention_kwargs={"scale": SCALE}))
        .images
    )
    plain = with_lora(tiny.sd3_pipeline(), sd3_loras["aes"])(**call_kwargs(joint_attention_kwargs={"scale": SCALE}))
    assert max_diff(out, plain.images) <= 1e-5
    unscaled = with_lora(tiny.sd3_pipeline(), sd3_loras["aes"])(**call_kwargs())
    assert max_diff(plain.images, unscaled.images) > 1e-3
