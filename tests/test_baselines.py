"""The baselines against independent computations: the LoRA soup against layers merged by hand from the LoRA files,
CoDe and guidance against the base sampler they reduce to, and the steering they add against its definition."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch

from diffusion_blend.baselines import BaseSampler, RewardedSoup, code_sample, guided_sample
from diffusion_blend.baselines.guidance import Probes, reward_gradient
from diffusion_blend.finetune.path import StochasticPath
from diffusion_blend.presets import digits
from diffusion_blend.presets.digits.sampler import base_sampler
from diffusion_blend.rewards import get_reward

PAIR = ("bold", "stencil")
PROMPTS = ["3", "8", "0"]
STEPS = 6
#: the path's float32 steps against diffusers' (same coefficients, other association): 7e-5 measured over 6 steps
SAMPLER_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def pipe():
    return digits.load_pipeline()


@pytest.fixture(scope="module")
def sampler(pipe) -> BaseSampler:
    return base_sampler(pipe, PROMPTS, {name: get_reward(name) for name in PAIR}, steps=STEPS)


def generators(seed: int = 0, count: int = len(PROMPTS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + index) for index in range(count)]


def equal_weights(count: int = len(PROMPTS)) -> torch.Tensor:
    return torch.full((count, len(PAIR)), 0.5, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------- soup
def lora_updates(folder) -> dict[str, torch.Tensor]:
    """module path → (B, A, scale) read from a LoRA file (rank and alpha from its metadata)."""
    state = safetensors.torch.load_file(next(folder.glob("*.safetensors")))
    pairs = {}
    for key in state:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            pairs[module] = (state[key.replace("lora_A", "lora_B")], state[key])
    return pairs


def update(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B·A as a weight of the adapted layer (a linear layer's, or a convolution's with a 1×1 B)."""
    return torch.einsum("or,r...->o...", b.flatten(1), a)


def merged_pipe(pipe, deltas: dict[str, torch.Tensor]):
    """The pipeline with every adapted layer's weight W replaced by W + Δ (scale 1: the digits LoRAs' alpha = rank)."""
    merged = copy.deepcopy(pipe)
    with torch.no_grad():
        for module, delta in deltas.items():
            merged.unet.get_submodule(module).weight += delta
    return merged


def sample(pipeline_call, **options):
    return pipeline_call(
        prompt=PROMPTS, num_inference_steps=STEPS, output_type="pt", generator=generators(), **options
    ).images


def test_the_lora_soup_is_the_weighted_sum_of_the_updates(pipe):
    weights = {"bold": 0.3, "stencil": 0.7}
    files = {name: lora_updates(digits.basis_models()[name]) for name in PAIR}
    deltas = {module: sum(weights[name] * update(*files[name][module]) for name in PAIR) for module in files["bold"]}
    expected = sample(merged_pipe(digits.load_pipeline(), deltas))
    soup = RewardedSoup(digits.load_pipeline(), {name: digits.basis_models()[name] for name in PAIR})
    assert torch.allclose(sample(soup, weights=weights), expected, atol=1e-5)
    assert not torch.allclose(expected, sample(digits.load_pipeline()), atol=1e-3)  # the updates matter


def test_the_published_soup_averages_a_and_b_and_so_differs_by_the_cross_terms(pipe):
    weights = {"bold": 0.3, "stencil": 0.7}
    files = {name: lora_updates(digits.basis_models()[name]) for name in PAIR}
    exact, published = {}, {}
    for module in files["bold"]:
        (b1, a1), (b2, a2) = files["bold"][module], files["stencil"][module]
        w1, w2 = weights["bold"], weights["stencil"]
        exact[module] = w1 * update(b1, a1) + w2 * update(b2, a2)
        cross = (
            w1 * w2 * (update(b1, a2) + update(b2, a1)) + (w1**2 - w1) * update(b1, a1) + (w2**2 - w2) * update(b2, a2)
        )
        published[module] = exact[module] + cross
    soup = RewardedSoup(
        digits.load_pipeline(), {name: digits.basis_models()[name] for name in PAIR}, variant="published"
    )
    got = sample(soup, weights=weights)
    assert torch.allclose(got, sample(merged_pipe(digits.load_pipeline(), published)), atol=1e-5)
    assert not torch.allclose(got, sample(merged_pipe(digits.load_pipeline(), exact)), atol=1e-3)


def test_a_soup_leaves_the_pipeline_as_it_was_between_calls(pipe):
    plain = sample(digits.load_pipeline())
    soup = RewardedSoup(digits.load_pipeline(), {name: digits.basis_models()[name] for name in PAIR})
    sample(soup, weights={"bold": 1.0})
    assert torch.equal(sample(soup.blend.pipe), plain)
    assert torch.equal(sample(soup, weights={"bold": 1.0}), sample(soup, weights={"bold": 1.0, "stencil": 0.0}))


def test_a_soup_of_full_members_averages_their_parameters(pipe):
    members = {}
    for index, name in enumerate(PAIR):
        member = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            for parameter in member.parameters():
                parameter.add_(0.01 * (index + 1))
        members[name] = member
    weights = {"bold": 0.25, "stencil": 0.75}
    expected_pipe = copy.deepcopy(pipe)
    with torch.no_grad():
        for key, value in expected_pipe.unet.state_dict().items():
            if value.is_floating_point():
                value.copy_(sum(weights[name] * members[name].state_dict()[key] for name in PAIR))
    soup = RewardedSoup(copy.deepcopy(pipe), members)
    assert torch.allclose(sample(soup, weights=weights), sample(expected_pipe), atol=1e-5)


@pytest.mark.parametrize(
    "variant, basis, message",
    [
        ("mean", None, "variant"),
        ("updates", "mixed", "one kind"),
    ],
)
def test_bad_soups_are_refused(pipe, variant, basis, message):
    loras = {name: digits.basis_models()[name] for name in PAIR}
    if basis == "mixed":
        loras["full"] = copy.deepcopy(pipe.unet)
    with pytest.raises(ValueError, match=message):
        RewardedSoup(digits.load_pipeline(), loras, variant=variant)


# ---------------------------------------------------------------------------------------------- the base sampler
def test_the_base_sampler_samples_what_the_pipeline_samples(pipe, sampler):
    expected = pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, eta=1.0, generator=generators(), output_type="latent"
    ).images
    assert torch.allclose(sampler.sample(generators()), expected, atol=SAMPLER_TOLERANCE)
    assert not torch.allclose(sampler.sample(generators(seed=5)), expected, atol=0.1)


# ------------------------------------------------------------------------------------------------------------ CoDe
@pytest.mark.parametrize("branching", ["block", "step"])
def test_code_with_one_candidate_is_the_base_sampler(sampler, branching):
    got = code_sample(sampler, generators(), equal_weights(), candidates=1, block=4, branching=branching)
    assert torch.equal(got, sampler.sample(generators()))


def test_code_keeps_the_best_candidate_of_a_single_block():
    """One block over the whole path: CoDe returns, of its N final candidates, the one of highest reward."""
    toy = toy_sampler()
    weights = torch.ones(4, 1, dtype=torch.float64)
    got = code_sample(toy, generators(count=4), weights, candidates=5, block=len(toy.path.steps))
    candidates = []
    for generator in generators(count=4):  # the candidates' draws, image by image, as CoDe takes them
        x = toy.initial([generator]).repeat(5, 1)
        for index, step in enumerate(toy.path.steps):
            x = toy.step(index, x, toy.predict(x, step.timestep, None), toy.noise([generator], 5))
        candidates.append(x[toy.rewards(x, None)[:, 0].argmax()])
    assert torch.allclose(got, torch.stack(candidates), atol=1e-6)


def test_more_candidates_reach_higher_rewards():
    toy = toy_sampler()
    weights = torch.ones(64, 1, dtype=torch.float64)
    few = code_sample(toy, generators(count=64), weights, candidates=1, block=2)
    many = code_sample(toy, generators(count=64), weights, candidates=8, block=2)
    assert toy.rewards(many, None).mean() > toy.rewards(few, None).mean() + 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"candidates": 0}, "candidates"),
        ({"block": 0}, "block"),
        ({"branching": "leaf"}, "branching"),
    ],
)
def test_bad_code_options_are_refused(sampler, options, message):
    with pytest.raises(ValueError, match=message):
        code_sample(sampler, generators(), equal_weights(), **options)


# -------------------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("through_denoiser", [True, False])
def test_guidance_of_scale_zero_is_the_base_sampler(sampler, through_denoiser):
    got = guided_sample(sampler, generators(), equal_weights(), scale=0.0, through_denoiser=through_denoiser)
    assert torch.equal(got, sampler.sample(generators()))


@pytest.mark.parametrize("through_denoiser", [True, False])
def test_guidance_raises_the_reward(through_denoiser):
    toy = toy_sampler()
    weights = torch.ones(64, 1, dtype=torch.float64)
    plain = toy.sample(generators(count=64))
    guided = guided_sample(toy, generators(count=64), weights, scale=1.0, through_denoiser=through_denoiser)
    assert toy.rewards(guided, None).mean() > toy.rewards(plain, None).mean() + 0.5


def test_the_black_box_gradient_estimate_points_along_the_true_gradient():
    toy = toy_sampler(differentiable=False)
    points = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    estimate = reward_gradient(toy, points, torch.arange(16), 0, Probes(torch.Generator().manual_seed(4), 64, 0.1))
    cosine = torch.nn.functional.cosine_similarity(estimate, toy_direction().expand_as(estimate), dim=1)
    assert float(cosine.min()) > 0.7


def test_bad_guidance_options_are_refused(sampler):
    with pytest.raises(ValueError, match="scale"):
        guided_sample(sampler, generators(), equal_weights(), scale=-1.0)
    with pytest.raises(ValueError, match=r"weights must be \[images, rewards\]"):
        guided_sample(sampler, generators(), torch.ones(3, 3))


# ---------------------------------------------------------------------------------------------------------- helpers
def toy_direction() -> torch.Tensor:
    return torch.linspace(-1, 1, 8)


def toy_sampler(differentiable: bool = True) -> BaseSampler:
    """A standard normal in 8 dimensions (ε-prediction: ε(x_t) = √(1 − ᾱ_t) x_t exactly), rewarded by a linear
    function: reward-seeking samplers must raise it by moving along its direction."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    path = StochasticPath.from_scheduler(scheduler, 10)
    alphas = scheduler.alphas_cumprod

    def predict(x, timestep, rows):
        return (1 - alphas[int(timestep)]).sqrt() * x

    def rewards(x0, rows):
        return (x0 @ toy_direction()).unsqueeze(1)

    return BaseSampler(path, predict, rewards, [differentiable], (8,))
