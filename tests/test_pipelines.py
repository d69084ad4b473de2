"""Blend inside real diffusers pipelines (tiny random SD, SDXL and SD3): it reproduces the plain pipeline, equals a
hand-written reference loop, and leaves the pipeline as it found it."""

from __future__ import annotations

import pytest
import torch

from diffusion_blend import Blend
from helpers import references, tiny
from helpers.calls import PROMPT, SIZE, call_kwargs, lora_denoiser, max_diff, with_lora

SD_SCHEDULERS = [("ddim", 0.0), ("ddim", 1.0), ("dpm", 0.0), ("euler", 0.0)]
GUIDANCE = [1.0, 5.0]  # without and with classifier-free guidance
BLENDS = {  # name: (weights, kl_scale)
    "mix": ({"ir": 0.3, "aes": 0.7}, 1.0),
    "kl-0.5": ({"ir": 1.0}, 0.5),
    "kl-2": ({"ir": 1.0}, 2.0),
    "joint": ({"ir": 0.6, "aes": 0.2}, 1.4),
}


# ------------------------------------------------------------------------------------------ one-hot and λ = 0
@pytest.mark.parametrize("scheduler, eta", SD_SCHEDULERS)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sd_one_hot_reproduces_the_pipeline_with_that_lora(sd_loras, scheduler, eta, guidance):
    blend = Blend(tiny.sd_pipeline(scheduler), sd_loras)
    out = blend.blend(weights={"aes": 1.0}, **call_kwargs(guidance=guidance, eta=eta)).images
    plain = with_lora(tiny.sd_pipeline(scheduler), sd_loras["aes"])(**call_kwargs(guidance=guidance, eta=eta)).images
    assert max_diff(out, plain) <= 1e-5
    assert max_diff(plain, tiny.sd_pipeline(scheduler)(**call_kwargs(guidance=guidance, eta=eta)).images) > 1e-2


def test_a_style_lora_left_active_stays_in_base_and_members(sd_loras, tmp_path):
    """One-hot = the pipeline with the style and that member active; λ = 0 = the pipeline with the style alone."""
    style = tiny.make_lora_file(tmp_path / "style", 12)
    styled = with_lora(tiny.sd_pipeline(), style, name="style")
    blend = Blend(styled, sd_loras)
    one_hot = blend.blend(weights={"aes": 1.0}, **call_kwargs()).images
    base = blend.blend(weights={"aes": 1.0}, kl_scale=0.0, **call_kwargs()).images
    assert styled.get_active_adapters() == ["style"]
    assert max_diff(base, styled(**call_kwargs()).images) <= 1e-5
    both = with_lora(with_lora(tiny.sd_pipeline(), style, name="style"), sd_loras["aes"], name="aes")
    both.set_adapters(["style", "aes"])
    assert max_diff(one_hot, both(**call_kwargs()).images) <= 1e-5
    assert max_diff(base, tiny.sd_pipeline()(**call_kwargs()).images) > 1e-2  # the style does change the images


@pytest.mark.parametrize("scheduler, eta", SD_SCHEDULERS)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sd_kl_scale_zero_reproduces_the_base(sd_loras, scheduler, eta, guidance):
    blend = Blend(tiny.sd_pipeline(scheduler), sd_loras)
    out = blend.blend(weights={"ir": 0.5, "aes": 0.5}, kl_scale=0.0, **call_kwargs(guidance=guidance, eta=eta)).images
    base = tiny.sd_pipeline(scheduler)(**call_kwargs(guidance=guidance, eta=eta)).images
    assert max_diff(out, base) <= 1e-5


@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sdxl_one_hot_and_kl_zero(sdxl_loras, guidance):
    blend = Blend(tiny.sdxl_pipeline(), sdxl_loras)
    out = blend.blend(weights={"ir": 1.0}, **call_kwargs(guidance=guidance)).images
    plain = with_lora(tiny.sdxl_pipeline(), sdxl_loras["ir"])(**call_kwargs(guidance=guidance)).images
    assert max_diff(out, plain) <= 1e-5
    out = blend.blend(weights={"ir": 1.0}, kl_scale=0.0, **call_kwargs(guidance=guidance)).images
    assert max_diff(out, tiny.sdxl_pipeline()(**call_kwargs(guidance=guidance)).images) <= 1e-5


@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sd3_one_hot_and_kl_zero(sd3_loras, guidance):
    blend = Blend(tiny.sd3_pipeline(), sd3_loras)
    assert blend.denoiser_name == "transformer"
    out = blend.blend(weights={"aes": 1.0}, **call_kwargs(guidance=guidance)).images
    plain = with_lora(tiny.sd3_pipeline(), sd3_loras["aes"])(**call_kwargs(guidance=guidance)).images
    assert max_diff(out, plain) <= 1e-5
    out = blend.blend(weights={"aes": 1.0}, kl_scale=0.0, **call_kwargs(guidance=guidance)).images
    assert max_diff(out, tiny.sd3_pipeline()(**call_kwargs(guidance=guidance)).images) <= 1e-5


# ---------------------------------------------------------------------------------- against reference loops
@pytest.mark.parametrize("blend_name", BLENDS)
@pytest.mark.parametrize("scheduler, eta", SD_SCHEDULERS)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sd_blend_equals_reference_loop(sd_loras, blend_name, scheduler, eta, guidance):
    weights, kl_scale = BLENDS[blend_name]
    pipe = tiny.sd_pipeline(scheduler)
    models = {"base": tiny.unet(0), **{n: lora_denoiser(tiny.unet, f) for n, f in sd_loras.items()}}
    expected = references.stable_diffusion(
        pipe, models, weights, kl_scale, prompt=PROMPT, steps=4, guidance=guidance, seed=0, eta=eta, size=SIZE
    )
    out = Blend(pipe, sd_loras).blend(weights=weights, kl_scale=kl_scale, **call_kwargs(guidance=guidance, eta=eta))
    assert max_diff(out.images, expected) <= 1e-5


@pytest.mark.parametrize("blend_name", BLENDS)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_sd3_blend_equals_reference_loop(sd3_loras, blend_name, guidance):
    weights, kl_scale = BLENDS[blend_name]
    pipe = tiny.sd3_pipeline()
    models = {
        "base": tiny.sd3_transformer(0),
        **{n: lora_denoiser(tiny.sd3_transformer, f, prefix="transformer") for n, f in sd3_loras.items()},
    }
    expected = references.stable_diffusion_3(
        pipe, models, weights, kl_scale, prompt=PROMPT, steps=4, guidance=guidance, seed=0, size=SIZE
    )
    out = Blend(pipe, sd3_loras).blend(weights=weights, kl_scale=kl_scale, **call_kwargs(guidance=guidance))
    assert max_diff(out.images, expected) <= 1e-5


class ExpandedBlendUNet(references.ExpandedBlend):
    """An independent stand-in UNet computing the expanded formula from separate plain models (for SDXL, whose
    added conditioning a hand-written loop would have to re-derive)."""

    def __init__(self, models, weights, kl_scale):
        super().__init__(models, weights, kl_scale)
        self.add_embedding = models["base"].add_embedding


@pytest.mark.parametrize("blend_name", ["mix", "joint"])
def test_sdxl_blend_equals_reference_denoiser(sdxl_loras, blend_name):
    weights, kl_scale = BLENDS[blend_name]
    models = {"base": tiny.sdxl_unet(0), **{n: lora_denoiser(tiny.sdxl_unet, f) for n, f in sdxl_loras.items()}}
    reference_pipe = tiny.sdxl_pipeline()
    reference_pipe.unet = ExpandedBlendUNet(models, weights, kl_scale)
    expected = reference_pipe(**call_kwargs()).images
    out = Blend(tiny.sdxl_pipeline(), sdxl_loras).blend(weights=weights, kl_scale=kl_scale, **call_kwargs()).images
    assert max_diff(out, expected) <= 1e-5


# ------------------------------------------------------------------------------------ LoRA vs full members
@pytest.mark.parametrize("blend_name", ["mix", "kl-2", "joint"])
def test_lora_members_equal_fused_full_members(sd_loras, blend_name):
    weights, kl_scale = BLENDS[blend_name]
    fused = {name: tiny.fused_copy(tiny.unet, path) for name, path in sd_loras.items()}
    with_loras = Blend(tiny.sd_pipeline(), sd_loras).blend(weights=weights, kl_scale=kl_scale, **call_kwargs())
    with_modules = Blend(tiny.sd_pipeline(), fused).blend(weights=weights, kl_scale=kl_scale, **call_kwargs())
    assert max_diff(with_loras.images, with_modules.images) <= 1e-4


def test_sd3_lora_members_equal_fused_full_members(sd3_loras):
    fused = {name: tiny.fused_copy(tiny.sd3_transformer, p, prefix="transformer") for name, p in sd3_loras.items()}
    kwargs = dict(weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4)
    with_loras = Blend(tiny.sd3_pipeline(), sd3_loras).blend(**kwargs, **call_kwargs())
    with_modules = Blend(tiny.sd3_pipeline(), fused).blend(**kwargs, **call_kwargs())
    assert max_diff(with_loras.images, with_modules.images) <= 1e-4


def test_full_member_one_hot_equals_the_pipeline_with_that_unet():
    member = tiny.unet(7)
    out = Blend(tiny.sd_pipeline(), {"ft": member}).blend(weights={"ft": 1.0}, **call_kwargs()).images
    plain = tiny.sd_pipeline()
    plain.unet = tiny.unet(7)
    assert max_diff(out, plain(**call_kwargs()).images) <= 1e-5


def test_full_member_from_a_denoiser_folder(tmp_path):
    tiny.unet(7).save_pretrained(tmp_path / "ft")
    out = Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"}).blend(weights={"ft": 1.0}, **call_kwargs()).images
    plain = tiny.sd_pipeline()
    plain.unet = tiny.unet(7)
    assert max_diff(out, plain(**call_kwargs()).images) <= 1e-5


def test_full_member_from_a_pipeline_folder(tmp_path):
    tiny.sd_pipeline(denoiser_seed=7).save_pretrained(tmp_path / "ft")
    out = Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"}).blend(weights={"ft": 1.0}, **call_kwargs()).images
    plain = tiny.sd_pipeline(denoiser_seed=7)
    assert max_diff(out, plain(**call_kwargs()).images) <= 1e-5


# --------------------------------------------------------------------------------------------- stochastic
def test_stochastic_is_reproducible(sd_loras):
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    kwargs = dict(weights={"ir": 0.5, "aes": 0.5}, mode="stochastic", num_images_per_prompt=3)
    first = blend.blend(**kwargs, **call_kwargs(seed=3)).images
    second = blend.blend(**kwargs, **call_kwargs(seed=3)).images
    assert max_diff(first, second) == 0.0


def test_stochastic_without_a_generator_follows_torchs_global_seed(sd_loras):
    """As diffusers draws its noise from torch's global generator when given none."""
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    kwargs = dict(weights={"ir": 0.5, "aes": 0.5}, mode="stochastic", num_images_per_prompt=3)
    images = []
    for _ in range(2):
        torch.manual_seed(5)
        images.append(blend.blend(**kwargs, **call_kwargs(generator=None)).images)
    assert max_diff(*images) == 0.0


def _recorded_draws(blend):
    """Every draw of the blend's stochastic mode, in order."""
    draws, draw = [], blend.denoiser.draw_members
    blend.denoiser.draw_members = lambda *args: draws.append(draw(*args).tolist()) or torch.tensor(draws[-1])
    return draws


def test_a_generator_reused_for_the_next_call_draws_anew(sd_loras):
    """(A data set generated prompt by prompt with one generator must not use the same member at every step.)"""
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    generator, draws = torch.Generator().manual_seed(1), _recorded_draws(blend)
    for _ in range(2):
        blend.blend(weights={"ir": 0.5, "aes": 0.5}, mode="stochastic", **call_kwargs(steps=8, generator=generator))
    assert draws[:8] != draws[8:]


def test_stochastic_with_identical_members_equals_the_mix(sd_loras):
    """(Up to float rounding: the mix stacks twice the rows in its call, and on some CPUs a layer's result
    depends on the batch size in the last bits.)"""
    twins = {"ir": sd_loras["ir"], "twin": sd_loras["ir"]}
    blend = Blend(tiny.sd_pipeline("ddim"), twins)
    stochastic = blend.blend(weights={"ir": 0.5, "twin": 0.5}, mode="stochastic", **call_kwargs(eta=1.0)).images
    mixed = blend.blend(weights={"ir": 0.5, "twin": 0.5}, **call_kwargs(eta=1.0)).images
    assert max_diff(stochastic, mixed) <= 1e-6


def test_stochastic_one_hot_equals_the_mix(sd_loras):
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    stochastic = blend.blend(weights={"ir": 1.0}, mode="stochastic", kl_scale=0.7, **call_kwargs()).images
    mixed = blend.blend(weights={"ir": 1.0}, kl_scale=0.7, **call_kwargs()).images
    assert max_diff(stochastic, mixed) <= 1e-6


# ------------------------------------------------------------------------------------- pipeline hygiene
def test_pipeline_is_unchanged_outside_blend_calls(sd_loras):
    pipe = tiny.sd_pipeline()
    before = pipe(**call_kwargs()).images
    config_before = dict(pipe.config)
    blend = Blend(pipe, sd_loras)
    assert max_diff(pipe(**call_kwargs()).images, before) == 0.0
    blend.blend(weights={"ir": 0.5, "aes": 0.5}, **call_kwargs())
    assert pipe.unet is blend.base
    assert dict(pipe.config) == config_before
    assert max_diff(pipe(**call_kwargs()).images, before) == 0.0


def test_users_adapter_activation_is_kept(sd_loras, tmp_path):
    style = tiny.make_lora_file(tmp_path / "style", seed=40)
    pipe = with_lora(tiny.sd_pipeline(), style, name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    styled = pipe(**call_kwargs()).images
    pipe.disable_lora()  # the blend is made on the plain base
    blend = Blend(pipe, sd_loras)
    blend.blend(weights={"ir": 1.0}, **call_kwargs())
    pipe.enable_lora()
    assert pipe.get_active_adapters() == ["style"]
    assert max_diff(pipe(**call_kwargs()).images, styled) == 0.0


def test_denoiser_is_restored_when_the_call_raises(sd_loras):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)

    def explode(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        blend.blend(weights={"ir": 1.0}, callback_on_step_end=explode, **call_kwargs())
    assert pipe.unet is blend.base


def test_weights_change_between_calls_without_reloading(sd_loras):
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    first = blend.blend(weights={"ir": 1.0}, **call_kwargs()).images
    blend.blend(weights={"aes": 1.0}, **call_kwargs())
    again = blend.blend(weights={"ir": 1.0}, **call_kwargs()).images
    assert max_diff(first, again) == 0.0


def test_prompt_embeds_and_callbacks_pass_through(sd_loras):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    steps = []
    out = blend.blend(
        weights={"ir": 0.3, "aes": 0.7},
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda _p, step, _t, kw: steps.append(step) or kw,
    )
    assert out.images.shape == (1, 4, SIZE // 2, SIZE // 2)
    assert steps == [0, 1, 2]


def test_from_pretrained_loads_a_pipeline_folder(sd_pipeline_folder, sd_loras):
    blend = Blend.from_pretrained(sd_pipeline_folder, basis=sd_loras, torch_dtype=torch.float32)
    out = blend.blend(weights={"aes": 1.0}, **call_kwargs()).images
    plain = with_lora(tiny.sd_pipeline(), sd_loras["aes"])(**call_kwargs()).images
    assert max_diff(out, plain) <= 1e-5


@pytest.mark.parametrize("dtype_argument", ["torch_dtype", "dtype"])  # diffusers' old name and its current one
def test_from_pretrained_loads_in_the_dtype_given(sd_pipeline_folder, sd_loras, dtype_argument):
    blend = Blend.from_pretrained(sd_pipeline_folder, basis=sd_loras, **{dtype_argument: torch.bfloat16})
    assert blend.pipe.unet.dtype == torch.bfloat16 and blend.pipe.vae.dtype == torch.bfloat16


def test_from_pretrained_refuses_two_dtypes(sd_pipeline_folder, sd_loras):
    with pytest.raises(ValueError, match="torch_dtype or dtype, not both"):
        Blend.from_pretrained(sd_pipeline_folder, basis=sd_loras, torch_dtype=torch.float32, dtype=torch.bfloat16)


def test_a_blend_called_from_its_own_callback_says_so(sd_loras):
    blend = Blend(tiny.sd_pipeline(), sd_loras)

    def blend_again(pipe, step, timestep, tensors):
        blend.blend(weights={"ir": 1.0}, **call_kwargs())

    with pytest.raises(ValueError, match="in the middle of a call"):
        blend.blend(weights={"ir": 1.0}, **call_kwargs(callback_on_step_end=blend_again))
    assert blend.pipe.unet is blend.base


def test_blend_after_unload_raises(sd_loras):
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    blend.unload()
    with pytest.raises(ValueError, match="was unloaded"):
        blend.blend(weights={"ir": 1.0}, **call_kwargs())
    with pytest.raises(ValueError, match="was unloaded"):
        _ = blend.names


def test_blend_after_the_pipeline_unloaded_the_loras_raises(sd_loras):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="no longer loaded"):
        blend.blend(weights={"ir": 1.0}, **call_kwargs())


def test_model_cpu_offload_gives_the_same_images(sd_loras):
    expected = Blend(tiny.sd_pipeline(), sd_loras).blend(weights={"ir": 0.3, "aes": 0.7}, **call_kwargs()).images
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks' logic runs on a CPU too
    for _ in range(2):
        out = blend.blend(weights={"ir": 0.3, "aes": 0.7}, **call_kwargs()).images
        assert max_diff(out, expected) <= 1e-6
    assert pipe.unet is blend.base and "_hf_hook" in pipe.unet.__dict__
    assert "_hf_hook" not in blend.denoiser.__dict__
    assert max_diff(pipe(**call_kwargs()).images, tiny.sd_pipeline()(**call_kwargs()).images) <= 1e-6


def test_model_cpu_offload_with_full_members_raises():
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, {"ft": tiny.unet(7)})
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="offload with full-module members"):
        blend.blend(weights={"ft": 1.0}, **call_kwargs())
