"""Blend in the pipelines that give the denoiser more than latents and text: img2img (a noised image), inpainting
(the mask and masked image as extra channels), ControlNet (residuals added inside the UNet), IP-Adapter (image
tokens in every cross-attention), Flux (position ids without a batch axis, distilled guidance per row), Qwen-Image
(true CFG as two calls, per-sample image shapes), Z-Image (lists of per-sample latents and captions, passed
positionally). Their extra inputs must follow each row of a stacked call. Perturbed-attention guidance (PAG) splits the
denoiser's rows into parts: members are then called on the pipeline's own rows. Full members must carry what the
base carries."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

from diffusion_blend import Blend, BlendedDenoiser
from helpers import tiny
from helpers.calls import LEAVE_OUT, call_kwargs, forward_calls, lora_base, max_diff, with_lora

_generator = torch.Generator().manual_seed(5)
IMAGE = torch.rand(1, 3, 16, 16, generator=_generator)
MASK = (torch.rand(1, 1, 16, 16, generator=_generator) > 0.5).float()
VARIANTS = {  # name: (pipeline builder, the pipeline's own extra arguments)
    "img2img": (tiny.img2img_pipeline, {"image": IMAGE, "strength": 0.7, "height": LEAVE_OUT, "width": LEAVE_OUT}),
    "inpaint": (tiny.inpaint_pipeline, {"image": IMAGE, "mask_image": MASK}),
    "controlnet": (tiny.controlnet_pipeline, {"image": IMAGE}),
    "pag": (tiny.pag_pipeline, {"pag_scale": 3.0}),
    "sd3_pag": (tiny.sd3_pag_pipeline, {"pag_scale": 3.0}),
    "ip_adapter": (tiny.ip_adapter_pipeline, {"ip_adapter_image_embeds": [tiny.ip_adapter_embeds()]}),
    "flux": (
        tiny.flux_pipeline,
        {
            "prompt": None,
            "guidance_scale": 3.5,  # guidance distilled: no CFG batch
            "prompt_embeds": torch.randn(2, 6, tiny.FLUX_CONTEXT, generator=_generator),
            "pooled_prompt_embeds": torch.randn(2, tiny.FLUX_CONTEXT, generator=_generator),
        },
    ),
    "qwen": (
        tiny.qwen_pipeline,
        {
            "prompt": None,
            "guidance_scale": None,
            "true_cfg_scale": 4.0,
            "num_images_per_prompt": 2,
            "prompt_embeds": torch.randn(1, 7, tiny.QWEN_CONTEXT, generator=_generator),
            "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 5, tiny.QWEN_CONTEXT, generator=_generator),
            "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
        },
    ),
    "zimage": (
        tiny.zimage_pipeline,
        {
            "prompt": None,
            "guidance_scale": 4.0,
            "num_images_per_prompt": 2,
            "prompt_embeds": [torch.randn(7, tiny.ZIMAGE_CONTEXT, generator=_generator)],
            "negative_prompt_embeds": [torch.randn(4, tiny.ZIMAGE_CONTEXT, generator=_generator)],
        },
    ),
}
LORAS = {"flux": "flux_loras", "sd3_pag": "sd3_loras", "qwen": "qwen_loras", "zimage": "zimage_loras"}


@pytest.fixture
def loras(request):
    """The LoRA files for the variant's denoiser."""
    variant = request.node.callspec.params["variant"]
    return request.getfixturevalue(LORAS.get(variant, "sd_loras"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_hot_reproduces_the_pipeline_with_that_lora(loras, variant):
    build, extra = VARIANTS[variant]
    out = Blend(build(), loras).blend(weights={"aes": 1.0}, **call_kwargs(**extra)).images
    plain = with_lora(build(), loras["aes"])(**call_kwargs(**extra)).images
    assert max_diff(out, plain) <= 1e-5
    assert max_diff(plain, build()(**call_kwargs(**extra)).images) > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_rows_carry_their_extra_inputs(loras, variant):
    """Base and members stacked in one call (each row's residuals, mask channels gathered with it) equal one
    whole-batch call per member. (Under PAG both are calls per member: see the PAG tests below.)"""
    build, extra = VARIANTS[variant]
    weights = {"ir": 0.6, "aes": 0.2}
    stacked = Blend(build(), loras).blend(weights=weights, kl_scale=1.4, **call_kwargs(**extra)).images
    separate = (
        Blend(build(), loras, batch_members=False).blend(weights=weights, kl_scale=1.4, **call_kwargs(**extra)).images
    )
    assert max_diff(stacked, separate) <= 1e-5


def test_perturbed_attention_guidance_with_full_members():
    """One-hot = the PAG pipeline with that UNet; the members' own attention processors are theirs again after."""
    members = {"ir": tiny.unet(1), "aes": tiny.unet(2)}
    processors = {name: member.attn_processors for name, member in members.items()}
    out = Blend(tiny.pag_pipeline(), members).blend(weights={"aes": 1.0}, **call_kwargs(pag_scale=3.0)).images
    plain = tiny.pag_pipeline(tiny.unet(2))(**call_kwargs(pag_scale=3.0)).images
    assert max_diff(out, plain) <= 1e-5
    assert all(members[name].attn_processors == processors[name] for name in members)


def test_a_blended_denoiser_put_in_a_pag_pipeline_leaves_its_members_processors_as_the_bases():
    """PAG installs its processors on every attention layer of the wrapper, members' included, and restores the
    originals through the wrapper's set_attn_processor: on the members too."""
    pipe, members = tiny.pag_pipeline(), {"ir": tiny.unet(1), "aes": tiny.unet(2)}
    pipe.unet = BlendedDenoiser(pipe.unet, members)
    pipe.unet.set_blend({"aes": 1.0})
    out = pipe(**call_kwargs(pag_scale=3.0)).images
    assert max_diff(out, tiny.pag_pipeline(tiny.unet(2))(**call_kwargs(pag_scale=3.0)).images) <= 1e-5
    processors = {type(processor) for member in members.values() for processor in member.attn_processors.values()}
    assert processors == {type(processor) for processor in pipe.unet.base.attn_processors.values()}


def test_a_full_member_whose_name_matches_a_pag_layer_pattern_is_refused():
    """pag_applied_layers=["mid"] matches every layer of a member named "humid" (modules_by_name.humid.…)."""
    with pytest.raises(
        ValueError,
        match=r"member 'humid' has perturbed-attention-guidance processors on 3 attention layer\(s\) "
        "where the base has none",
    ):
        Blend(tiny.pag_pipeline(), {"humid": tiny.unet(1)}).blend(weights={"humid": 1.0}, **call_kwargs(pag_scale=3.0))


def test_perturbed_attention_guidance_lora_members_equal_fused_full_members(sd_loras):
    fused = {name: tiny.fused_copy(tiny.unet, path) for name, path in sd_loras.items()}
    weights = {"ir": 0.6, "aes": 0.2}
    with_loras = Blend(tiny.pag_pipeline(), sd_loras).blend(weights=weights, kl_scale=1.4, **call_kwargs(pag_scale=3.0))
    with_modules = Blend(tiny.pag_pipeline(), fused).blend(weights=weights, kl_scale=1.4, **call_kwargs(pag_scale=3.0))
    assert max_diff(with_loras.images, with_modules.images) <= 1e-4


def test_perturbed_attention_guidance_in_stochastic_mode(sd_loras):
    """Every row of a sample (its three parts) goes through its drawn member, in calls of the pipeline's rows: with
    every draw the same member, the PAG pipeline with that LoRA."""
    drawn = (
        Blend(tiny.pag_pipeline(), sd_loras)
        .blend(weights={"ir": 1.0, "aes": 0.0}, mode="stochastic", **call_kwargs(pag_scale=3.0))
        .images
    )
    plain = with_lora(tiny.pag_pipeline(), sd_loras["ir"])(**call_kwargs(pag_scale=3.0)).images
    assert max_diff(drawn, plain) <= 1e-5


def test_a_row_cap_that_splits_a_pag_call_is_refused(sd_loras):
    blend = Blend(tiny.pag_pipeline(), sd_loras, max_batch_size=2)  # the PAG pipeline calls the UNet on 3 rows
    with pytest.raises(ValueError, match="max_batch_size=2 would split the pipeline's call of 3 rows"):
        blend.blend(weights={"ir": 0.5, "aes": 0.5}, **call_kwargs(pag_scale=3.0))


@pytest.mark.parametrize("kl_scale", [1.0, 0.5])
def test_perturbed_attention_guidance_with_mixed_draws_equals_each_samples_own_member(kl_scale):
    """PAG's processor on the mid block, four samples drawing different members: each sample's three rows
    (unconditional, conditional, perturbed) are its drawn member's, as in a PAG call of that member alone."""
    base = lora_base()
    for name, module in base.named_modules():
        if name.startswith("mid_block") and name.endswith("attn1"):
            module.processor = PAGCFGIdentitySelfAttnProcessor2_0()
    generator = torch.Generator().manual_seed(1)
    samples, t = 4, torch.tensor(400)
    latents = torch.randn(samples, 4, 8, 8, generator=generator)
    prompt, negative = (torch.randn(samples, 5, tiny.TEXT_HIDDEN, generator=generator) for _ in range(2))
    sample, context = torch.cat([latents] * 3), torch.cat([negative, prompt, prompt])
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend(
        {"ir": 0.5, "aes": 0.5}, kl_scale=kl_scale, mode="stochastic", generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        blended = denoiser(sample, t, encoder_hidden_states=context).sample
        drawn = denoiser._draws.previous.draws[:samples].tolist()
        assert len(set(drawn)) == 2  # both members drawn
        for index, member in enumerate(drawn):
            rows = torch.tensor([index, samples + index, 2 * samples + index])
            outputs = []
            for active in ([], ["ir", "aes"][member]):
                base.set_adapter(active)
                outputs.append(base(sample[rows], t, encoder_hidden_states=context[rows]).sample)
            base.set_adapter([])
            assert max_diff(blended[rows], outputs[0] + kl_scale * (outputs[1] - outputs[0])) <= 1e-5


def test_an_ip_adapter_loaded_on_the_base_alone_is_refused_with_full_members():
    """Full members would be evaluated without the image prompt: the base's configuration no longer matches."""
    blend = Blend(tiny.sd_pipeline(), {"ir": tiny.unet(1)})
    blend.pipe.unet._load_ip_adapter_weights([tiny.ip_adapter_state_dict(blend.pipe.unet)])
    with pytest.raises(
        ValueError,
        match="member 'ir' has a different architecture than the base "
        "\\(encoder_hid_dim_type: None vs base 'ip_image_proj'\\)",
    ):
        blend.blend(weights={"ir": 1.0}, **call_kwargs(ip_adapter_image_embeds=[tiny.ip_adapter_embeds()]))


def _with_ip_adapters(seeds: dict[str, int]) -> dict:
    """Full members, each with an IP-Adapter of its own (random weights from its seed)."""
    members = {name: tiny.unet(seed) for name, seed in (("ir", 1), ("aes", 2))}
    for name, member in members.items():
        member._load_ip_adapter_weights([tiny.ip_adapter_state_dict(member, seed=seeds[name])])
    return members


def test_full_members_with_ip_adapters_of_their_own_are_blended():
    members, embeds = _with_ip_adapters({"ir": 21, "aes": 22}), [tiny.ip_adapter_embeds()]
    for name in members:  # one-hot: the pipeline with that member, its own IP-Adapter included
        out = (
            Blend(tiny.ip_adapter_pipeline(), members)
            .blend(weights={name: 1.0}, **call_kwargs(ip_adapter_image_embeds=embeds))
            .images
        )
        plain = tiny.ip_adapter_pipeline()
        plain.unet = members[name]
        assert max_diff(out, plain(**call_kwargs(ip_adapter_image_embeds=embeds)).images) <= 1e-5
    vmapped, separate = (
        Blend(tiny.ip_adapter_pipeline(), members, vmap_full_members=vmap)
        .blend(weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4, **call_kwargs(ip_adapter_image_embeds=embeds))
        .images
        for vmap in (True, False)
    )
    assert max_diff(vmapped, separate) <= 1e-5


def test_an_ip_adapter_scale_set_on_the_base_alone_is_refused():
    """``pipe.set_ip_adapter_scale`` reaches the pipeline's denoiser alone."""
    blend = Blend(tiny.ip_adapter_pipeline(), _with_ip_adapters({"ir": 21, "aes": 22}))
    blend.pipe.set_ip_adapter_scale(0.5)
    with pytest.raises(
        ValueError,
        match=r"member 'ir' has other IP-Adapter settings than the base "
        r"\(scales \['\[1.0\]'\] vs base scales \['\[0.5\]'\]\)",
    ):
        blend.blend(weights={"ir": 1.0}, **call_kwargs(ip_adapter_image_embeds=[tiny.ip_adapter_embeds()]))


def test_vmapped_members_follow_an_ip_adapter_scale_changed_after_a_blend():
    members, embeds = _with_ip_adapters({"ir": 21, "aes": 22}), [tiny.ip_adapter_embeds()]
    vmapped = Blend(tiny.ip_adapter_pipeline(), members, vmap_full_members=True)
    vmapped.blend(weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4, **call_kwargs(ip_adapter_image_embeds=embeds))
    vmapped.pipe.set_ip_adapter_scale(0.3)
    for member in members.values():
        _set_ip_scale(member, 0.3)
    separate = Blend(tiny.ip_adapter_pipeline(), members)
    separate.pipe.set_ip_adapter_scale(0.3)
    assert (
        max_diff(
            *(
                blend.blend(
                    weights={"ir": 0.6, "aes": 0.2}, kl_scale=1.4, **call_kwargs(ip_adapter_image_embeds=embeds)
                ).images
                for blend in (vmapped, separate)
            )
        )
        <= 1e-5
    )


def _set_ip_scale(denoiser, scale):
    """What ``pipe.set_ip_adapter_scale`` does, on a denoiser outside a pipeline."""
    for layer in denoiser.modules():
        if hasattr(getattr(layer, "processor", None), "to_k_ip"):
            layer.processor.scale = [scale] * len(layer.processor.scale)


FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def test_freeu_on_the_base_alone_is_refused_with_full_members():
    blend = Blend(tiny.sd_pipeline(), {"ir": tiny.unet(1)})
    blend.pipe.enable_freeu(**FREEU)
    with pytest.raises(
        ValueError,
        match=r"member 'ir' has other FreeU settings than the base \(off vs base "
        r"\{'s1': 0.9, 's2': 0.2, 'b1': 1.2, 'b2': 1.4\}\)",
    ):
        blend.blend(weights={"ir": 1.0}, **call_kwargs())


def test_freeu_on_every_full_member_is_blended():
    member = tiny.unet(1)
    member.enable_freeu(**FREEU)
    pipe = tiny.sd_pipeline()
    pipe.enable_freeu(**FREEU)
    out = Blend(pipe, {"ir": member}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    plain = tiny.sd_pipeline()
    plain.unet = member
    assert max_diff(out, plain(**call_kwargs()).images) <= 1e-5
    unfree = tiny.sd_pipeline()
    unfree.unet = tiny.unet(1)
    assert max_diff(out, unfree(**call_kwargs()).images) > 1e-3  # FreeU does change the images


# ------------------------------------------------------------------------ pipelines that switch denoisers (Wan 2.2)
WAN_PROMPT = torch.randn(1, 12, 16, generator=_generator)
WAN_NEGATIVE = torch.randn(1, 12, 16, generator=_generator)


def _wan_call(**extra):
    """A short Wan 2.2 call: 4 steps, the last two below the boundary (the low-noise expert's)."""
    return (
        dict(
            prompt=None,
            prompt_embeds=WAN_PROMPT,
            negative_prompt_embeds=WAN_NEGATIVE,
            height=16,
            width=16,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=4.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        | extra
    )


def test_a_pipeline_switching_denoisers_must_be_told_what_to_blend(wan_loras):
    with pytest.raises(
        ValueError,
        match=r"WanPipeline switches between denoisers during sampling \(transformer, "
        r"transformer_2\): give each basis a source per denoiser.*"
        r"or choose one with denoiser='transformer'",
    ):
        Blend(tiny.wan22_pipeline(), wan_loras)


def _per_expert(loras):
    """Each basis a LoRA per expert, crossed so that a mix-up of experts shows: ir = (ir, aes), aes = (aes, ir)."""
    return {
        "ir": {"transformer": loras["ir"], "transformer_2": loras["aes"]},
        "aes": {"transformer": loras["aes"], "transformer_2": loras["ir"]},
    }


def test_both_experts_one_hot_is_the_pipeline_with_each_experts_lora(wan_loras):
    out = Blend(tiny.wan22_pipeline(), _per_expert(wan_loras)).blend(weights={"aes": 1.0}, **_wan_call()).frames
    plain = tiny.wan22_pipeline()
    plain.load_lora_weights(str(wan_loras["aes"]), adapter_name="high")
    plain.load_lora_weights(str(wan_loras["ir"]), adapter_name="low", load_into_transformer_2=True)
    assert max_diff(out, plain(**_wan_call()).frames) <= 1e-5


@pytest.mark.parametrize(
    "mode, weights, kl_scale", [("mix", {"ir": 0.6, "aes": 0.2}, 1.4), ("stochastic", {"ir": 0.5, "aes": 0.5}, 0.5)]
)
def test_both_experts_stacked_equal_separate_calls(wan_loras, mode, weights, kl_scale):
    stacked, separate = (
        Blend(tiny.wan22_pipeline(), _per_expert(wan_loras), batch_members=batch_members)
        .blend(weights=weights, kl_scale=kl_scale, mode=mode, **_wan_call())
        .frames
        for batch_members in (True, False)
    )
    assert max_diff(stacked, separate) <= 1e-5


def test_both_experts_are_the_pipelines_own_again_after_a_call(wan_loras):
    pipe = tiny.wan22_pipeline()
    experts = pipe.transformer, pipe.transformer_2
    Blend(pipe, _per_expert(wan_loras)).blend(weights={"ir": 0.5, "aes": 0.5}, **_wan_call())
    assert (pipe.transformer, pipe.transformer_2) == experts
    assert not experts[0].active_adapters() and not experts[1].active_adapters()


@pytest.mark.parametrize(
    "basis, message",
    [
        (lambda loras: {"ir": loras["ir"]}, r"basis 'ir': blending transformer, transformer_2 needs a source for each"),
        (
            lambda loras: {"ir": {"transformer": loras["ir"]}, "aes": _per_expert(loras)["aes"]},
            r"basis 'ir' gives sources for transformer, but the blend is of transformer, transformer_2",
        ),
    ],
)
def test_a_basis_missing_an_expert_is_refused_before_loading(wan_loras, basis, message):
    pipe = tiny.wan22_pipeline()
    with pytest.raises(ValueError, match=message):
        Blend(pipe, basis(wan_loras), denoiser=("transformer", "transformer_2"))
    assert not getattr(pipe.transformer, "peft_config", None) and not getattr(pipe.transformer_2, "peft_config", None)


@pytest.mark.parametrize("denoiser", ["transformer", "transformer_2"])
def test_one_hot_on_a_chosen_expert_is_the_pipeline_with_that_lora_on_it(wan_loras, denoiser):
    """The LoRA file carries diffusers' ``transformer.`` keys, for either expert (as ``load_into_transformer_2``)."""
    out = Blend(tiny.wan22_pipeline(), wan_loras, denoiser=denoiser).blend(weights={"aes": 1.0}, **_wan_call()).frames
    plain = tiny.wan22_pipeline()
    plain.load_lora_weights(
        str(wan_loras["aes"]), adapter_name="aes", load_into_transformer_2=denoiser == "transformer_2"
    )
    expected = plain(**_wan_call()).frames
    assert max_diff(out, expected) <= 1e-5
    assert max_diff(expected, tiny.wan22_pipeline()(**_wan_call()).frames) > 1e-3


def test_a_basis_leaving_every_expert_unchanged_is_refused(wan_loras):
    with pytest.raises(
        ValueError, match=r"basis 'aes' leaves every denoiser unchanged \(no source, or None for each\)"
    ):
        Blend(tiny.wan22_pipeline(), _per_expert(wan_loras) | {"aes": {"transformer": None, "transformer_2": None}})


def test_an_expert_that_fails_to_load_leaves_neither_expert_changed(wan_loras, tmp_path):
    pipe = tiny.wan22_pipeline()
    basis = {"ir": {"transformer": tmp_path / "missing", "transformer_2": wan_loras["ir"]}}
    with pytest.raises(ValueError, match="does not exist"):
        Blend(pipe, basis)
    assert not getattr(pipe.transformer, "peft_config", None) and not getattr(pipe.transformer_2, "peft_config", None)


@pytest.fixture(scope="module")
def wan22_folders(tmp_path_factory):
    """The tiny Wan 2.2 pipeline and a fine-tune of both its experts (other seeds), saved as diffusers folders."""
    root = tmp_path_factory.mktemp("wan22")
    tiny.wan22_pipeline().save_pretrained(root / "base")
    fine_tuned = tiny.wan22_pipeline()
    fine_tuned.transformer, fine_tuned.transformer_2 = tiny.wan_transformer(5), tiny.wan_transformer(6)
    fine_tuned.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _bf16_wan(folder):
    """Loaded as Wan runs, in bfloat16: diffusers keeps a few of its modules in float32 (_keep_in_fp32_modules)."""
    from diffusers import DiffusionPipeline

    return tiny._quiet(
        DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16, text_encoder=None, tokenizer=None)
    )


def _bf16_call():
    return _wan_call(
        prompt_embeds=WAN_PROMPT.to(torch.bfloat16), negative_prompt_embeds=WAN_NEGATIVE.to(torch.bfloat16)
    )


@pytest.mark.parametrize("batch_members", [True, False])
def test_bf16_wan22_one_hot_members_are_what_diffusers_runs(wan22_folders, wan_loras, batch_members):
    """LoRA members per expert, and full members from the fine-tune's folder (each expert from its subfolder,
    its float32 modules kept so), one-hot = diffusers' own pipeline with them."""
    base_folder, fine_tuned_folder = wan22_folders
    basis = _per_expert(wan_loras) | {"ft": {"transformer": fine_tuned_folder, "transformer_2": fine_tuned_folder}}
    blend = Blend(_bf16_wan(base_folder), basis, batch_members=batch_members)
    with_loras = _bf16_wan(base_folder)
    with_loras.load_lora_weights(str(wan_loras["aes"]), adapter_name="high")
    with_loras.load_lora_weights(str(wan_loras["ir"]), adapter_name="low", load_into_transformer_2=True)
    assert max_diff(blend.blend(weights={"aes": 1.0}, **_bf16_call()).frames, with_loras(**_bf16_call()).frames) == 0
    fine_tuned = _bf16_wan(fine_tuned_folder)(**_bf16_call()).frames
    assert max_diff(blend.blend(weights={"ft": 1.0}, **_bf16_call()).frames, fine_tuned) == 0
    assert max_diff(fine_tuned, _bf16_wan(base_folder)(**_bf16_call()).frames) > 1e-2


def test_both_experts_are_restored_when_the_call_fails_midway(wan_loras):
    pipe = tiny.wan22_pipeline()
    experts = pipe.transformer, pipe.transformer_2
    blend = Blend(pipe, _per_expert(wan_loras))

    def fail_in_the_low_noise_steps(pipe, step, timestep, tensors):
        if step == 2:
            raise RuntimeError("stop")
        return tensors

    with pytest.raises(RuntimeError, match="stop"):
        blend.blend(weights={"ir": 0.5, "aes": 0.5}, **_wan_call(callback_on_step_end=fail_in_the_low_noise_steps))
    assert (pipe.transformer, pipe.transformer_2) == experts
    assert (
        max_diff(
            blend.blend(weights={"aes": 1.0}, **_wan_call()).frames,
            Blend(tiny.wan22_pipeline(), _per_expert(wan_loras)).blend(weights={"aes": 1.0}, **_wan_call()).frames,
        )
        == 0
    )


def test_a_blend_of_two_experts_reports_both(wan_loras):
    """The first expert's basis is a full module, the second's a LoRA: the Blend still has LoRA members."""
    blend = Blend(
        tiny.wan22_pipeline(), {"ft": {"transformer": tiny.wan_transformer(5), "transformer_2": wan_loras["ir"]}}
    )
    assert blend.denoiser_names == ["transformer", "transformer_2"]
    assert blend.lora_names == [] and blend.experts[0].lora_names == ["ft"] and blend.has_lora_members


def _one_expert_basis(pipe, loras, unchanged=None):
    """ir adapts both experts, aes the low-noise expert only (``unchanged`` for the other: None, or the
    pipeline's own module)."""
    return {
        "ir": {"transformer": loras["ir"], "transformer_2": loras["ir"]},
        "aes": {"transformer": unchanged(pipe) if unchanged else pipe.transformer, "transformer_2": loras["aes"]},
    }


@pytest.mark.parametrize("unchanged", [lambda pipe: None, lambda pipe: pipe.transformer], ids=["None", "own module"])
@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_a_basis_fine_tuned_on_one_expert_leaves_the_other_the_base(wan_loras, mode, unchanged):
    pipe = tiny.wan22_pipeline()
    out = (
        Blend(pipe, _one_expert_basis(pipe, wan_loras, unchanged))
        .blend(weights={"aes": 1.0, "ir": 0.0}, mode=mode, **_wan_call())
        .frames
    )
    plain = tiny.wan22_pipeline()
    plain.load_lora_weights(str(wan_loras["aes"]), adapter_name="low", load_into_transformer_2=True)
    assert max_diff(out, plain(**_wan_call()).frames) <= 1e-5


def test_a_member_that_is_the_base_is_evaluated_with_the_base(wan_loras):
    """High-noise steps of ir = aes = 0.5: the base and ir's rows in one call, as many calls as the plain pipeline;
    equal to the blend where aes's high-noise member is a separate copy of the base."""
    pipe, plain = tiny.wan22_pipeline(), tiny.wan22_pipeline()
    calls, plain_calls = forward_calls(pipe.transformer), forward_calls(plain.transformer)
    out = Blend(pipe, _one_expert_basis(pipe, wan_loras)).blend(weights={"ir": 0.5, "aes": 0.5}, **_wan_call()).frames
    plain(**_wan_call())
    assert len(calls) == len(plain_calls)
    copy = tiny.wan22_pipeline()
    basis = _one_expert_basis(copy, wan_loras) | {
        "aes": {"transformer": tiny.wan_transformer(0), "transformer_2": wan_loras["aes"]}
    }
    assert max_diff(out, Blend(copy, basis).blend(weights={"ir": 0.5, "aes": 0.5}, **_wan_call()).frames) <= 1e-5
