"""The SMC corrector inside a pipeline call (``Blend.blend(..., corrector=SMC(...))``): draw for draw the algorithm of
``smc_sample`` on separately loaded plain models, one particle per image returned, the guided base followed, bad
input refused before sampling; and its CLI (``generate --smc``) and sweep (``db-smc``) faces."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from typer.testing import CliRunner

from diffusion_blend import Blend
from diffusion_blend.cli import app
from diffusion_blend.evaluate.config import ConfigError, parse_config
from diffusion_blend.finetune.path import StochasticPath
from diffusion_blend.presets import digits
from diffusion_blend.presets.digits.pipeline import NULL_CLASS, to_images
from diffusion_blend.smc import SMC, smc_sample
from helpers.references import expanded_blend

WEIGHTS = {"bold": 0.5, "stencil": 0.5}
STEPS = 6
runner = CliRunner()


def brightness(images, prompts):
    """A smooth stand-in reward: mean ink (large differences between particles: the weights move)."""
    return 40 * images.mean(dim=(1, 2, 3))


def top_heavy(images, prompts):
    height = images.shape[-2]
    return 40 * (images[..., : height // 2, :].mean(dim=(1, 2, 3)) - images[..., height // 2 :, :].mean(dim=(1, 2, 3)))


REWARDS = {"bold": brightness, "stencil": top_heavy}


@pytest.fixture(scope="module")
def blend() -> Blend:
    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    basis = digits.basis_models()
    return Blend(pipe, {name: basis[name] for name in WEIGHTS})


def plain_models() -> dict:
    """The base's and each basis model's denoiser, each loaded on its own plain pipeline (no Blend involved)."""
    models = {"base": digits.load_pipeline().unet}
    for name in WEIGHTS:
        pipe = digits.load_pipeline()
        pipe.load_lora_weights(str(digits.basis_models()[name]))
        models[name] = pipe.unet
    return models


def reference(labels, start, generator, options, guidance_scale):
    """``smc_sample`` on the plain models: the guided blend in its expanded form and the guided base."""
    models = plain_models()
    count = options.particles
    rows = torch.tensor(labels).repeat_interleave(count)
    classes = torch.cat([torch.full_like(rows, NULL_CLASS), rows])

    @torch.no_grad()
    def predict(x, timestep):
        guided = {}
        for name, model in models.items():
            out = model(torch.cat([x, x]), timestep, encoder_hidden_states=None, class_labels=classes).sample
            unconditional, conditional = out.chunk(2)
            guided[name] = unconditional + guidance_scale * (conditional - unconditional)
        return expanded_blend(guided, WEIGHTS, 1.0), guided["base"]

    prompts = [str(label) for label in labels for _ in range(count)]

    def rewards(x0):
        images = to_images(x0)
        return torch.stack([REWARDS[name](images, prompts) for name in WEIGHTS], 1).double()

    scheduler = copy.deepcopy(digits.load_pipeline().scheduler)
    path = StochasticPath.from_scheduler(scheduler, STEPS, eta=1.0)
    weights = torch.tensor(list(WEIGHTS.values()), dtype=torch.float64)
    return smc_sample(path, predict, rewards, weights, alpha=1.0, start=start, generator=generator, options=options)


def corrected(blend, options, **call):
    call = dict(prompt=["3", "7", "1"], num_inference_steps=STEPS, eta=1.0, output_type="pt") | call
    return blend.blend(weights=WEIGHTS, corrector=options, **call).images


def test_the_corrected_pipeline_call_is_smc_sample_on_the_plain_models(blend):
    """Same start (given latents), same generator: the same resamplings and the same images, classifier-free
    guidance included (the base's rows combined as the pipeline combines the blend's)."""
    start = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    options = SMC(particles=4, rewards=REWARDS, alpha=1.0)
    images = corrected(blend, options, latents=start, generator=torch.Generator().manual_seed(1), guidance_scale=1.5)
    expected, trace = reference([3, 7, 1], start, torch.Generator().manual_seed(1), options, guidance_scale=1.5)
    assert trace.resampled, "the weights must move for the comparison to cover resampling"
    assert blend.smc_trace.resampled == trace.resampled
    assert torch.allclose(blend.smc_trace.log_normaliser, trace.log_normaliser, atol=1e-4)
    assert images.shape == (3, 3, 16, 16)
    assert torch.allclose(images, to_images(expected), atol=1e-4)


def test_the_base_is_evaluated_in_the_same_calls_as_the_members(blend):
    calls = []
    handle = blend.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        corrected(blend, SMC(particles=2, rewards=REWARDS, alpha=1.0), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # one denoiser call per step: base and both members on 3 images × 2 particles × 2 guidance halves
    assert calls == [3 * 2 * 2 * 3] * STEPS


def test_each_image_draws_from_its_own_generator(blend):
    """With a generator per image, an image's particles, resamplings and choice do not depend on the others."""
    options = SMC(particles=3, rewards=REWARDS, alpha=1.0)
    together = corrected(blend, options, generator=[torch.Generator().manual_seed(seed) for seed in (4, 5, 6)])
    alone = corrected(blend, options, prompt="7", generator=[torch.Generator().manual_seed(5)])
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_the_corrector_refuses_a_deterministic_sampler_before_sampling(blend):
    with pytest.raises(ValueError, match="eta in \\(0, 1\\]"):
        corrected(blend, SMC(particles=2, rewards=REWARDS, alpha=1.0), eta=0.0)


def test_the_corrector_refuses_a_scheduler_without_a_gaussian_step():
    pipe = digits.load_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    blend = Blend(pipe, {"bold": digits.basis_models()["bold"]})
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        blend.blend(prompt="3", weights={"bold": 1.0}, corrector=SMC(particles=2, rewards=REWARDS, alpha=1.0))


@pytest.mark.parametrize(
    ("options", "call", "message"),
    [
        (SMC(particles=2, rewards={"bold": brightness}, alpha=1.0), {}, "no reward for 'stencil'"),
        (SMC(particles=2, alpha=1.0), {}, "needs rewards"),
        (SMC(particles=2, rewards=REWARDS), {}, "alpha"),
        (SMC(particles=2, rewards=REWARDS, alpha=1.0), {"mode": "stochastic"}, "mode='mix'"),
        (SMC(particles=2, rewards=REWARDS, alpha=1.0), {"latents": torch.zeros(2, 1, 16, 16)}, "one row per image"),
    ],
)
def test_bad_corrector_input_is_refused_before_the_pipeline_runs(blend, options, call, message):
    calls = []
    handle = blend.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            corrected(blend, options, **call)
    finally:
        handle.remove()
    assert not calls


def test_a_reward_of_the_wrong_shape_is_named(blend):
    def scalar(images, prompts):
        return images.mean()

    with pytest.raises(ValueError, match="reward 'bold' must give one value per image"):
        corrected(blend, SMC(particles=2, rewards={"bold": scalar, "stencil": top_heavy}, alpha=1.0))


def test_fewer_than_one_particle_is_refused():
    with pytest.raises(ValueError, match="particles must be a positive integer"):
        SMC(particles=0)


def test_a_guidance_the_corrector_cannot_follow_is_refused(blend, monkeypatch):
    """The base's rows are combined as u + s (c − u); where the pipeline combined the blend's otherwise, stop."""
    monkeypatch.setattr(type(blend.pipe), "guidance_scale", property(lambda pipe: pipe._guidance_scale + 1))
    with pytest.raises(ValueError, match="other than as classifier-free guidance"):
        corrected(blend, SMC(particles=2, rewards=REWARDS, alpha=1.0), guidance_scale=2.0)


# --------------------------------------------------------------------------------------------------------- faces
def test_generate_with_smc_records_the_correction(tmp_path):
    out = tmp_path / "images"
    result = runner.invoke(
        app,
        [
            "generate",
            "--weights",
            "bold=0.5,stencil=0.5",
            "--prompt",
            "3",
            "--out",
            f"{out}/",
            "--num-images",
            "2",
            "--steps",
            "4",
            "--eta",
            "1",
            "--smc",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "settings.json").read_text())
    assert settings["smc"]["particles"] == 3 and settings["smc"]["rewards"] == {"bold": "bold", "stencil": "stencil"}
    assert settings["smc"]["alpha"] == digits.basis_alpha() and len(settings["smc"]["log_normaliser"]) == 2
    assert sorted(path.name for path in out.iterdir()) == ["image-000.png", "image-001.png", "settings.json"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--smc", "0"], "--smc must be >= 1"),
        (["--smc", "2", "--mode", "stochastic", "--weights", "bold=1"], "--mode mix"),
        (["--smc", "2", "--smc-reward", "bold=nope"], "unknown reward 'nope'"),
        (["--smc", "2", "--smc-reward", "other=bold"], "no --basis is"),
        (["--alpha", "2"], "give --smc K"),
        (["--smc", "2", "--eta", "0"], "eta in \\(0, 1\\]"),
    ],
)
def test_generate_refuses_bad_smc_options_and_writes_nothing(tmp_path, extra, message):
    out = tmp_path / "out.png"
    options = ["generate", "--weights", "bold=0.5,stencil=0.5", "--prompt", "3", "--out", str(out), "--steps", "2"]
    result = runner.invoke(app, [*options, *extra])
    assert result.exit_code != 0 and message.replace("\\", "") in result.output.replace("\n", " ")
    assert not out.exists()


def test_the_sweep_checks_db_smc_options():
    base = {"setting": "digits", "rewards": ["bold", "stencil"], "weights": [[0.5, 0.5]]}
    with pytest.raises(ConfigError, match="db-smc: SMC particles"):
        parse_config({**base, "methods": [{"name": "db-smc", "particles": 0}]})
    with pytest.raises(ConfigError, match="eta > 0"):
        parse_config({**base, "methods": ["db-smc"], "eta": 0.0})
    assert parse_config({**base, "methods": ["db-smc"]}).methods[0].options["particles"] == 8


def test_a_latent_model_is_weighed_on_its_decoded_estimate(sd_loras):
    """Stable Diffusion (tiny): the potentials score the VAE-decoded x̂₀; draw for draw ``smc_sample`` on plain
    models with the same text conditioning."""
    from diffusion_blend.images import decoded
    from helpers import tiny
    from helpers.calls import PROMPT, SIZE, lora_denoiser

    pipe = tiny.sd_pipeline("ddim")
    weights = {"ir": 0.7, "aes": 0.6}
    rewards = {"ir": brightness, "aes": top_heavy}
    options = SMC(particles=3, rewards=rewards, alpha=0.5)
    scale, images = 4.0, 2
    start = torch.randn(images, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    blend = Blend(pipe, dict(sd_loras))
    out = blend.blend(
        prompt=PROMPT,
        num_images_per_prompt=images,
        weights=weights,
        corrector=options,
        latents=start,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=STEPS,
        guidance_scale=scale,
        eta=1.0,
        height=SIZE,
        width=SIZE,
        output_type="latent",
    ).images

    models = {"base": tiny.unet(0)} | {name: lora_denoiser(tiny.unet, path) for name, path in sd_loras.items()}
    conditional, unconditional = pipe.encode_prompt(PROMPT, "cpu", images * 3, True)
    context = torch.cat([unconditional, conditional])

    @torch.no_grad()
    def predict(x, timestep):
        guided = {}
        for name, model in models.items():
            both = model(torch.cat([x, x]), timestep, encoder_hidden_states=context).sample.chunk(2)
            guided[name] = both[0] + scale * (both[1] - both[0])
        return expanded_blend(guided, weights, 1.0), guided["base"]

    def scored(x0):
        decoded_images = decoded(pipe, x0).float()
        return torch.stack([rewards[name](decoded_images, [PROMPT] * len(x0)) for name in weights], 1).double()

    path = StochasticPath.from_scheduler(copy.deepcopy(pipe.scheduler), STEPS, eta=1.0)
    expected, trace = smc_sample(
        path,
        predict,
        scored,
        torch.tensor(list(weights.values()), dtype=torch.float64),
        alpha=0.5,
        start=start,
        generator=torch.Generator().manual_seed(3),
        options=options,
    )
    assert trace.resampled and blend.smc_trace.resampled == trace.resampled
    assert out.shape == expected.shape == (images, *start.shape[1:])
    assert torch.allclose(out, expected, atol=1e-4)


def test_each_thread_reads_the_trace_of_its_own_last_call(blend):
    corrected(blend, SMC(particles=2, rewards=REWARDS, alpha=1.0), generator=torch.Generator().manual_seed(0))
    mine = blend.smc_trace
    other = threading.Thread(
        target=corrected,
        args=(blend, SMC(particles=3, rewards=REWARDS, alpha=1.0)),
        kwargs={"generator": torch.Generator().manual_seed(1)},
    )
    other.start()
    other.join()
    assert blend.smc_trace is mine and mine.log_normaliser is not None
