"""Weights per sample: a sweep over weights in one batch. Each sample's rows (both guidance halves) blend with its
own weights, exactly as a blend of that sample alone with those weights."""

from __future__ import annotations

import pytest
import torch

from diffusion_blend import Blend, BlendedDenoiser, blend_per_row, blend_predictions
from helpers import tiny
from helpers.calls import PROMPT, call_kwargs, cfg_inputs, lora_base, max_diff

SWEEP = [{"ir": 1.0, "aes": 0.0}, {"ir": 0.3, "aes": 0.7}, {"ir": -0.2, "aes": 0.9}]


def _members(kind):
    """LoRA members on one base, or full modules."""
    if kind == "lora":
        return lora_base(), {"ir": "ir", "aes": "aes"}
    return tiny.unet(0), {"ir": tiny.unet(1), "aes": tiny.unet(2)}


def _blended(denoiser, weights, sample, t, context, **blend):
    denoiser.set_blend(weights, **blend)
    with torch.no_grad():
        return denoiser(sample, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("batch_members", [True, False])
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("kl_scale", [1.0, 1.5])
def test_each_samples_rows_blend_with_its_own_weights(kind, batch_members, kl_scale):
    base, members = _members(kind)
    denoiser = BlendedDenoiser(base, members, batch_members=batch_members)
    sample, t, context = cfg_inputs(samples=len(SWEEP))
    swept = _blended(denoiser, SWEEP, sample, t, context, kl_scale=kl_scale)
    for index, weights in enumerate(SWEEP):
        rows = [index, len(SWEEP) + index]  # its unconditional and conditional rows
        alone = _blended(denoiser, weights, sample[rows], t, context[rows], kl_scale=kl_scale)
        assert max_diff(swept[rows], alone) <= 1e-6


@pytest.mark.parametrize("same_noise", [False, True], ids=["own noise", "same noise"])
def test_per_sample_stochastic_draws_with_each_samples_weights(same_noise):
    """Sample 0 always draws ir, sample 1 always aes: each is that member's blend alone — also where both start
    from the same noise (a sweep's settings do), which must not make them one sample."""
    base, members = _members("lora")
    denoiser = BlendedDenoiser(base, members)
    sample, t, context = cfg_inputs(samples=2)
    if same_noise:
        sample = sample[[0, 0, 0, 0]]
    one_hot = [{"ir": 1.0, "aes": 0.0}, {"ir": 0.0, "aes": 1.0}]
    swept = _blended(
        denoiser,
        one_hot,
        sample,
        t,
        context,
        kl_scale=0.5,
        mode="stochastic",
        generator=torch.Generator().manual_seed(0),
    )
    for index, weights in enumerate(one_hot):
        rows = [index, 2 + index]
        alone = _blended(denoiser, weights, sample[rows], t, context[rows], kl_scale=0.5)
        assert max_diff(swept[rows], alone) <= 1e-6


@pytest.mark.parametrize(
    "weights, kl_scale",
    [(SWEEP, 0.0), ([{"ir": 0.0}, {"aes": 0.0}, {}], 1.0)],
    ids=["λ = 0", "no weight on any member"],
)
def test_per_sample_blends_needing_no_member_are_the_base(weights, kl_scale):
    base, members = _members("lora")
    sample, t, context = cfg_inputs(samples=3)
    swept = _blended(BlendedDenoiser(base, members), weights, sample, t, context, kl_scale=kl_scale)
    with torch.no_grad():
        assert torch.equal(swept, base(sample, t, encoder_hidden_states=context).sample)


def test_weights_for_other_than_the_calls_samples_are_refused():
    denoiser = BlendedDenoiser(*_members("lora"))
    sample, t, context = cfg_inputs(samples=2)  # 4 rows: not 3 samples repeated
    with pytest.raises(ValueError, match="weights are given for 3 samples, but the denoiser is called with 4 rows"):
        _blended(denoiser, SWEEP, sample, t, context)


@pytest.mark.parametrize("weights", [[], "ir=1", [{"ir": 1.0}, {"style": 1.0}]])
def test_bad_per_sample_weights_are_refused(weights):
    denoiser = BlendedDenoiser(*_members("lora"))
    with pytest.raises(ValueError, match="weights must be|unknown weight name"):
        denoiser.set_blend(weights)


@pytest.mark.parametrize(
    "per_prompt, what",
    [({"weights": SWEEP[:2]}, "weights"), ({"weights": SWEEP[0], "kl_scale": [1.0, 0.5]}, "kl_scale values")],
)
def test_values_for_each_prompt_rather_than_each_image_are_refused(sd_loras, per_prompt, what):
    """Two prompts of two images each make four images: two values would be spread over them wrongly."""
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    with pytest.raises(ValueError, match=rf"{what} are given for 2 images, but the call makes 4 \(prompts × images"):
        blend.blend(**per_prompt, **call_kwargs(prompt=[PROMPT, PROMPT], num_images_per_prompt=2))


def test_one_value_in_a_list_for_several_images_is_refused(sd_loras):
    with pytest.raises(ValueError, match=r"weights are given for 1 images, but the call makes 3"):
        Blend(tiny.sd_pipeline(), sd_loras).blend(weights=SWEEP[:1], **call_kwargs(num_images_per_prompt=3))


def test_values_per_image_of_a_call_that_does_not_tell_its_images_are_refused(sd_loras):
    """Without a prompt or embeddings per prompt, the denoiser's rows cannot tell images from guidance halves."""
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="weights are given per image, but the call's arguments do not tell how many"):
        Blend(tiny.sd_pipeline(), sd_loras).blend(weights=SWEEP[:2], **call_kwargs(prompt=None, generator=generator))
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing ran


def test_per_prompt_embeddings_in_a_list_count_the_images(zimage_loras):
    """Z-Image takes its prompts' embeddings as a list, one tensor per prompt: two prompts of two images, four."""
    embeds = [torch.randn(5, tiny.ZIMAGE_CONTEXT, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    with pytest.raises(ValueError, match=r"weights are given for 2 images, but the call makes 4"):
        Blend(tiny.zimage_pipeline(), zimage_loras).blend(
            weights=SWEEP[:2], **call_kwargs(prompt=None, prompt_embeds=embeds, num_images_per_prompt=2)
        )


def test_blend_per_row_refuses_weights_for_other_rows():
    member = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="weights for 3 rows, predictions of 2"):
        blend_per_row(None, [member], torch.ones(3, 1))


def test_blend_per_row_is_each_rows_blend():
    generator = torch.Generator().manual_seed(0)
    base, first, second = (torch.randn(3, 4, 5, generator=generator) for _ in range(3))
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-0.2, 0.9]], dtype=torch.float64)
    per_row = blend_per_row(base, [first, second], weights, kl_scale=1.5)
    for row in range(3):
        expected = blend_predictions(base[row], [first[row], second[row]], weights[row].tolist(), kl_scale=1.5)
        assert torch.equal(per_row[row], expected)


def test_per_row_weights_are_not_rounded_to_half_precision():
    """0.1 + 0.9 of one bf16 prediction is that prediction (rounded to bf16, the weights would sum to 0.9985)."""
    member = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weights = torch.tensor([[0.1, 0.9], [0.9, 0.1]], dtype=torch.float64)
    blended = blend_per_row(None, [member, member], weights)
    assert blended.dtype == torch.bfloat16 and torch.equal(blended, member)


def test_a_pipeline_call_sweeps_weights_over_its_images(sd_loras):
    """Two images of one prompt, each with its own weights and generator: each is the image blended alone."""
    blend = Blend(tiny.sd_pipeline(), sd_loras)
    sweep = SWEEP[1:]
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    swept = blend.blend(weights=sweep, kl_scale=1.2, **call_kwargs(prompt=[PROMPT] * 2, generator=generators))
    for index, (weights, seed) in enumerate(zip(sweep, (3, 4))):
        alone = blend.blend(weights=weights, kl_scale=1.2, **call_kwargs(seed=seed)).images
        assert max_diff(swept.images[index : index + 1], alone) <= 1e-5


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_each_sample_may_have_its_own_kl_scale(mode):
    """A sweep over λ (DB-KLA's curve) in one batch: each sample's rows are its blend alone."""
    base, members = _members("lora")
    denoiser = BlendedDenoiser(base, members)
    sample, t, context = cfg_inputs(samples=3)
    weights = {"ir": 1.0, "aes": 0.0}  # (one member: the stochastic mode draws it for every sample)
    blend = dict(mode=mode, generator=torch.Generator().manual_seed(0))
    swept = _blended(denoiser, weights, sample, t, context, kl_scale=[0.0, 0.5, 2.0], **blend)
    for index, kl_scale in enumerate([0.0, 0.5, 2.0]):
        rows = [index, 3 + index]
        alone = _blended(denoiser, weights, sample[rows], t, context[rows], kl_scale=kl_scale, **blend)
        assert max_diff(swept[rows], alone) <= 1e-5  # (λ·w per row: another rounding than λ·(w·…))


def test_weights_and_kl_scale_per_sample_go_together():
    base, members = _members("lora")
    denoiser = BlendedDenoiser(base, members)
    sample, t, context = cfg_inputs(samples=3)
    swept = _blended(denoiser, SWEEP, sample, t, context, kl_scale=[1.0, 0.5, 2.0])
    for index, (weights, kl_scale) in enumerate(zip(SWEEP, [1.0, 0.5, 2.0])):
        rows = [index, 3 + index]
        assert (
            max_diff(swept[rows], _blended(denoiser, weights, sample[rows], t, context[rows], kl_scale=kl_scale))
            <= 1e-5
        )
    with pytest.raises(ValueError, match="kl_scale must be a number or one per sample .3 with the weights given"):
        denoiser.set_blend(SWEEP, kl_scale=[1.0, 0.5])


def test_samples_of_one_noise_in_a_sweep_over_kl_scale_draw_apart():
    """(Shared weights, λ per sample: the samples are still as many blends, told apart by their index.)"""
    denoiser = BlendedDenoiser(*_members("lora"))
    denoiser.set_blend(
        {"ir": 0.5, "aes": 0.5}, kl_scale=[1.0] * 8, mode="stochastic", generator=torch.Generator().manual_seed(0)
    )
    drawn = denoiser.draw_members(torch.randn(1, 4, 8, 8).repeat(16, 1, 1, 1)).tolist()
    assert drawn[:8] == drawn[8:] and len(set(drawn[:8])) == 2  # guidance halves together, samples apart


def test_draws_per_sample_follow_each_samples_weights():
    """20 000 samples: half drawing ir with probability 0.25, half with 0.9 (one 8-sample call, 2 500 times)."""
    denoiser = BlendedDenoiser(*_members("lora"))
    weights = [{"ir": 0.25, "aes": 0.75}, {"ir": 0.9, "aes": 0.1}] * 4
    denoiser.set_blend(weights, mode="stochastic", generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(8)
    for step in range(2500):
        counts += (denoiser.draw_members(torch.randn(8, 4, 2, 2), timestep=step) == 0).float()
    assert torch.allclose(counts[0::2] / 2500, torch.tensor(0.25), atol=0.03)
    assert torch.allclose(counts[1::2] / 2500, torch.tensor(0.9), atol=0.03)
