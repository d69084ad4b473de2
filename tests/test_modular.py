"""Modular Diffusers: a ``ModularPipeline`` holds its denoiser as an attribute like any pipeline, and its guider
calls it once per guidance batch (SDXL: the conditional and unconditional halves in separate calls). A blend in it
equals the same modular pipeline with that LoRA active, and λ = 0 the modular pipeline itself. A skip-layer guider
hooks the blocks of the denoiser it is given for its extra batch: the base's, and each full member's."""

from __future__ import annotations

import torch
from diffusers.guiders import ClassifierFreeGuidance, SkipLayerGuidance
from diffusers.hooks import LayerSkipConfig
from diffusers.modular_pipelines import FluxAutoBlocks, StableDiffusionXLAutoBlocks

from diffusion_blend import Blend
from helpers import tiny
from helpers.calls import max_diff

_generator = torch.Generator().manual_seed(5)
FLUX_EMBEDS = dict(
    prompt_embeds=torch.randn(1, 6, tiny.FLUX_CONTEXT, generator=_generator),
    pooled_prompt_embeds=torch.randn(1, tiny.FLUX_CONTEXT, generator=_generator),
)


def _modular_sdxl(guider=None, unet=None):
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(
        **{
            name: component
            for name, component in tiny.sdxl_pipeline().components.items()
            if name in pipe._component_specs and component is not None
        }
    )
    pipe.update_components(**{name: value for name, value in {"guider": guider, "unet": unet}.items() if value})
    return pipe


def _skip_layer_guider():
    """Skip-layer guidance at every step, skipping the first transformer block of the tiny UNet's second level."""
    return SkipLayerGuidance(
        guidance_scale=5.0,
        skip_layer_guidance_scale=3.0,
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        skip_layer_config=LayerSkipConfig(indices=[0], fqn="down_blocks.1.attentions.0.transformer_blocks"),
    )


def _modular_flux():
    """FLUX.1's blocks without the text encoder step: called with prompt embeddings."""
    blocks = FluxAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    pipe = blocks.init_pipeline()
    classic = tiny.flux_pipeline()
    pipe.update_components(transformer=classic.transformer, vae=classic.vae, scheduler=classic.scheduler)
    return pipe


def _call(**extra):
    return dict(
        extra, height=16, width=16, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)
    )


def _sdxl_call():
    return _call(prompt="A red colored car.", output="images")


def test_one_hot_in_a_modular_pipeline_is_that_lora(sdxl_loras):
    out = Blend(_modular_sdxl(), sdxl_loras).blend(weights={"aes": 1.0}, **_sdxl_call())
    plain = _modular_sdxl()
    plain.load_lora_weights(str(sdxl_loras["aes"]), adapter_name="aes")
    expected = plain(**_sdxl_call())
    assert max_diff(out, expected) <= 1e-5
    assert max_diff(expected, _modular_sdxl()(**_sdxl_call())) > 1e-2


def test_kl_scale_zero_in_a_modular_pipeline_is_the_pipeline(sdxl_loras):
    out = Blend(_modular_sdxl(), sdxl_loras).blend(weights={"aes": 1.0}, kl_scale=0.0, **_sdxl_call())
    assert max_diff(out, _modular_sdxl()(**_sdxl_call())) <= 1e-5


def test_a_blend_in_modular_flux_is_the_blend_in_its_classic_pipeline(flux_loras):
    """(FLUX.1's modular blocks compute what FluxPipeline computes.)"""
    blend = dict(weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4)
    out = Blend(_modular_flux(), flux_loras).blend(**blend, **_call(**FLUX_EMBEDS, guidance_scale=3.5, output="images"))
    classic = (
        Blend(tiny.flux_pipeline(), flux_loras)
        .blend(**blend, **_call(prompt=None, **FLUX_EMBEDS, guidance_scale=3.5))
        .images
    )
    assert max_diff(out, classic) <= 1e-5


def test_a_skip_layer_guider_hooks_the_lora_members_base(sdxl_loras):
    out = Blend(_modular_sdxl(_skip_layer_guider()), sdxl_loras).blend(weights={"aes": 1.0}, **_sdxl_call())
    plain = _modular_sdxl(_skip_layer_guider())
    plain.load_lora_weights(str(sdxl_loras["aes"]), adapter_name="aes")
    assert max_diff(out, plain(**_sdxl_call())) <= 1e-5
    guided_apart = _modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    guided_apart.load_lora_weights(str(sdxl_loras["aes"]), adapter_name="aes")
    assert max_diff(out, guided_apart(**_sdxl_call())) > 1e-3  # (the skip-layer batch matters)


def test_a_skip_layer_guider_hooks_each_full_member_and_leaves_none(sdxl_loras):
    fused = {name: tiny.fused_copy(tiny.sdxl_unet, path) for name, path in sdxl_loras.items()}
    out = Blend(_modular_sdxl(_skip_layer_guider()), fused).blend(weights={"aes": 1.0}, **_sdxl_call())
    alone = _modular_sdxl(_skip_layer_guider(), unet=tiny.fused_copy(tiny.sdxl_unet, sdxl_loras["aes"]))
    assert max_diff(out, alone(**_sdxl_call())) <= 1e-5
    assert not any(
        getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
        for member in fused.values()
        for module in member.modules()
    )
