"""The fine-tuner's pieces against independent computations: the sampling path against diffusers' own steps, the KL
and likelihood ratio against torch's Gaussian densities, the tempering rule against its definition, checkpoints
against the states they hold."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from torch.distributions import Normal

from diffusion_blend.finetune.checkpoint import pack, unpack
from diffusion_blend.finetune.path import StochasticPath, gaussian_log_ratio, kl
from diffusion_blend.finetune.weighted_dsm import effective_sample_fraction, next_temperature

F64 = torch.float64
#: diffusers computes its steps from float32 ᾱ tables; the path reads the same tables in float64
STEP_TOLERANCE = 2e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_path_is_diffusers_step(prediction_type, spacing):
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, timestep_spacing=spacing)
    path = StochasticPath.from_scheduler(scheduler, 20, eta=0.7)
    generator = torch.Generator().manual_seed(0)
    for step, timestep in zip(path.steps, scheduler.timesteps, strict=True):
        x, out, noise = torch.randn(3, 3, 5, generator=generator, dtype=F64)
        expected = scheduler.step(out, timestep, x, eta=0.7, variance_noise=noise).prev_sample
        assert torch.allclose(step.sample(step.mean(x, out), noise), expected, atol=STEP_TOLERANCE, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_path_is_diffusers_step(prediction_type):
    scheduler = DDPMScheduler(clip_sample=False, prediction_type=prediction_type, timestep_spacing="trailing")
    path = StochasticPath.from_scheduler(scheduler, 25)
    generator = torch.Generator().manual_seed(1)
    for index, (step, timestep) in enumerate(zip(path.steps, scheduler.timesteps, strict=True)):
        x, out = torch.randn(2, 3, 5, generator=generator, dtype=F64)
        noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(index), dtype=F64)  # what DDPM draws
        expected = scheduler.step(out, timestep, x, generator=torch.Generator().manual_seed(index)).prev_sample
        assert torch.allclose(step.sample(step.mean(x, out), noise), expected, atol=STEP_TOLERANCE, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_estimate_is_diffusers_predicted_original_sample(prediction_type):
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, timestep_spacing="trailing")
    path = StochasticPath.from_scheduler(scheduler, 10)
    generator = torch.Generator().manual_seed(2)
    for step, timestep in zip(path.steps, scheduler.timesteps, strict=True):
        x, out = torch.randn(2, 3, 5, generator=generator, dtype=F64)
        expected = scheduler.step(out, timestep, x, eta=0.0).pred_original_sample
        assert torch.allclose(step.clean(x, out), expected, atol=STEP_TOLERANCE, rtol=1e-6)


def test_last_ddim_step_towards_the_clean_sample_is_deterministic():
    path = StochasticPath.from_scheduler(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), 10)
    assert path.steps[-1].deterministic and path.steps[-1].alpha_bar_prev == 1.0
    assert not any(step.deterministic for step in path.steps[:-1])


def test_eta_zero_is_not_stochastic():
    assert not StochasticPath.from_scheduler(DDIMScheduler(clip_sample=False), 10, eta=0.0).stochastic


def test_memoryless_reads_the_first_noise_level():
    trailing = StochasticPath.from_scheduler(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), 50)
    stable_diffusion = DDIMScheduler(
        clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    assert trailing.memoryless
    assert not StochasticPath.from_scheduler(stable_diffusion, 50).memoryless  # √ᾱ_T ≈ 0.07


@pytest.mark.parametrize(
    "scheduler, message",
    [
        (EulerDiscreteScheduler(), "DDIM or DDPM"),
        (DDIMScheduler(clip_sample=True), "clips"),
        (DDPMScheduler(clip_sample=False, variance_type="fixed_large"), "fixed_small"),
    ],
)
def test_schedulers_without_a_gaussian_step_are_refused(scheduler, message):
    with pytest.raises(ValueError, match=message):
        StochasticPath.from_scheduler(scheduler, 10)


def test_kl_is_the_gaussian_kl_of_the_two_transitions():
    generator = torch.Generator().manual_seed(2)
    sigma, base_mean, shift = (
        0.3,
        torch.randn(4, 2, 3, generator=generator, dtype=F64),
        torch.randn(4, 2, 3, generator=generator, dtype=F64),
    )
    control = shift / sigma
    finetuned, base = Normal(base_mean + shift, sigma), Normal(base_mean, sigma)
    expected = torch.distributions.kl_divergence(finetuned, base).flatten(1).sum(1)
    assert torch.allclose(kl(control), expected, atol=1e-12)


def test_log_ratio_is_the_difference_of_gaussian_log_densities():
    generator = torch.Generator().manual_seed(3)
    sigma, base_mean = 0.2, torch.randn(5, 4, generator=generator, dtype=F64)
    control, noise = torch.randn(2, 5, 4, generator=generator, dtype=F64)
    x = base_mean + sigma * noise
    expected = (Normal(base_mean + sigma * control, sigma).log_prob(x) - Normal(base_mean, sigma).log_prob(x)).sum(1)
    assert torch.allclose(gaussian_log_ratio(noise, control), expected, atol=1e-10)


def test_effective_sample_fraction_of_equal_and_single_weights():
    assert effective_sample_fraction(torch.zeros(10)) == pytest.approx(1.0)
    assert effective_sample_fraction(torch.tensor([0.0] + [-1e4] * 9)) == pytest.approx(0.1)


def test_next_temperature_is_the_largest_step_keeping_the_ess():
    rewards = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=F64) * 3
    step = next_temperature(rewards, remaining=10.0, ess=0.3)
    assert 0 < step < 10
    assert effective_sample_fraction(step * rewards) >= 0.3
    assert effective_sample_fraction((step + 1e-6) * rewards) < 0.3


def test_next_temperature_takes_the_rest_when_it_can():
    rewards = torch.randn(1000, generator=torch.Generator().manual_seed(5), dtype=F64) * 0.01
    assert next_temperature(rewards, remaining=1.0, ess=0.3) == 1.0


def test_checkpoint_state_round_trips_exactly():
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    generator = torch.Generator().manual_seed(6)
    state = {
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "pair": (1, "a"),
        "missing": None,
        "nan": float("nan"),
        "buffers": [torch.arange(4), [torch.zeros(2)]],
    }
    tensors, skeleton = pack(state)
    restored = unpack(tensors, json.loads(json.dumps(skeleton)))
    assert restored["pair"] == (1, "a") and restored["missing"] is None and math.isnan(restored["nan"])
    assert list(restored["optimizer"]["state"]) == [0]  # int keys stay ints (optimizers index by them)
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(restored["generator"], generator.get_state())
    assert torch.equal(restored["buffers"][1][0], torch.zeros(2))
