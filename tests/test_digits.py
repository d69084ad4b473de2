"""The embedded digits model: its pipeline, its rewards against independent computations, the shipped weights and
their manifest, the default `generate`, `demo`, and retraining from the committed seeds."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusion_blend import Blend
from diffusion_blend.cli import app
from diffusion_blend.presets import digits
from diffusion_blend.presets.digits.pipeline import DigitsPipeline, digit_labels
from diffusion_blend.presets.digits.rewards import Bold, Legible, Stencil, pieces
from diffusion_blend.presets.digits.train import command as retrain_command
from diffusion_blend.rewards import get_reward

runner = CliRunner()
#: the shipped weights' size limit
MAX_WEIGHTS_BYTES = 10 * 2**20


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return digits.load_pipeline()


def _draw(pipe, prompt, seed=0, **options):
    options = {"num_inference_steps": 4, "output_type": "pt", **options}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


# ---------------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("prompt, labels", [("3", [3]), (7, [7]), (["0", 9, " 4 "], [0, 9, 4])])
def test_prompts_are_digits(prompt, labels):
    assert digit_labels(prompt) == labels


@pytest.mark.parametrize("prompt", ["12", "a", "", -1, True, [], ["3", "x"]])
def test_anything_else_is_refused(prompt):
    with pytest.raises(ValueError, match="digit"):
        digit_labels(prompt)


def test_the_same_seed_draws_the_same_digits(pipe):
    first, second = _draw(pipe, ["3", "5"], seed=1), _draw(pipe, ["3", "5"], seed=1)
    assert first.shape == (2, 3, 16, 16) and torch.equal(first, second)
    assert not torch.equal(first, _draw(pipe, ["3", "5"], seed=2))


def test_images_are_grey_in_the_unit_range(pipe):
    images = _draw(pipe, "8", num_images_per_prompt=3)
    assert images.shape == (3, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_output_types(pipe):
    assert isinstance(_draw(pipe, "1", output_type="pil")[0], Image.Image)
    assert _draw(pipe, "1", output_type="np").shape == (1, 16, 16, 3)
    assert _draw(pipe, "1", output_type="latent").shape == (1, 1, 16, 16)


def test_a_step_callback_sees_and_replaces_the_latents(pipe):
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    images = _draw(pipe, ["1", "2"], callback_on_step_end=callback)
    assert seen == [(2, 1, 16, 16)] * 4 and torch.all(images == 0.5)  # the last step's latents, replaced by zeros


def test_guidance_one_is_the_conditional_model_alone(pipe):
    """With guidance 1 the null class is never evaluated: the pipeline is the conditional sampler."""
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(len(args[0])))
    try:
        _draw(pipe, "2", guidance_scale=1.0)
    finally:
        handle.remove()
    assert calls == [1] * 4


# ----------------------------------------------------------------------------------------------------- rewards
def _strokes(seed: int = 0) -> torch.Tensor:
    ink = torch.zeros(2, 1, 16, 16)
    ink[0, 0, 3:13, 7:9] = 1.0  # one bar
    ink[1, 0, 2:5, 2:5] = 0.9  # two blobs and a faint haze
    ink[1, 0, 10:14, 9:12] = 0.8
    ink[1, 0] += 0.3 * (ink[1, 0] == 0)
    return ink.repeat(1, 3, 1, 1)


def test_legible_is_the_classifiers_log_probability_of_the_digit():
    reward = get_reward("legible")
    images = _strokes()
    logits = reward.classifier(images[:, :1])
    expected = torch.log_softmax(logits, 1)[[0, 1], [1, 7]]
    assert torch.allclose(reward(images, ["1", "7"]), expected, atol=1e-6)


def test_legible_is_differentiable():
    images = _strokes().requires_grad_(True)
    get_reward("legible")(images, ["1", "4"]).sum().backward()
    assert images.grad.abs().sum() > 0


def test_legible_refuses_a_prompt_that_is_not_one_digit():
    with pytest.raises(ValueError, match="digit"):
        get_reward("legible")(_strokes(), ["1", "17"])


def test_bold_counts_inked_pixels_softly():
    images = _strokes()
    ink = images[:, 0]
    expected = 100 * torch.sigmoid(12 * (ink - 0.5)).mean(dim=(1, 2))
    assert torch.allclose(Bold()(images, ["1", "1"]), expected)
    assert float(Bold()(images, ["1", "1"])[0]) == pytest.approx(100 * 20 / 256, abs=1)  # 20 inked pixels


def test_stencil_counts_the_gaps_between_pieces():
    assert Stencil()(_strokes(), ["1", "1"]).tolist() == [0.0, 1.0]  # one bar; two blobs (the haze is paper)
    assert Stencil()(torch.zeros(1, 3, 16, 16), ["1"]).tolist() == [-1.0]  # nothing drawn


def test_pieces_matches_scipy_on_random_masks():
    ndimage = pytest.importorskip("scipy.ndimage")
    masks = torch.rand(20, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.6
    expected = [ndimage.label(mask.numpy())[1] for mask in masks]  # 4-connectivity, scipy's default
    assert pieces(masks).tolist() == expected and max(expected) > 3


def test_the_registry_knows_the_digits_rewards():
    assert isinstance(get_reward("legible"), Legible) and get_reward("bold").differentiable
    assert not get_reward("stencil").differentiable


# ----------------------------------------------------------------------------------------------- shipped files
def test_the_shipped_weights_are_small_and_described():
    files = [path for path in digits.weights_folder().rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= MAX_WEIGHTS_BYTES
    manifest = digits.manifest()
    assert manifest["classifier"]["held_out_accuracy"] >= 0.95
    assert manifest["base"]["training_seconds"] <= 15 * 60
    assert set(digits.basis_models()) == {"legible", "bold", "stencil"}
    assert set(digits.oracles()) == {"bold=0.25,stencil=0.75", "bold=0.5,stencil=0.5", "bold=0.75,stencil=0.25"}
    for part in ("basis", "oracles"):
        assert all(run["evaluation"]["reward_gain"] > 0 for run in manifest[part]["runs"].values())


def test_each_manifest_entry_names_the_command_that_retrains_it():
    manifest = digits.manifest()
    basis_steps = manifest["basis"]["settings"]["steps"]
    for part in ("classifier", "base", "basis", "oracles", "reproduction"):
        assert manifest[part]["command"] == retrain_command(part, 0, manifest["base"]["steps"], basis_steps)


def test_a_shipped_basis_model_blends_as_it_loads_in_diffusers(pipe):
    blend = Blend(digits.load_pipeline(), basis={"bold": digits.basis_models()["bold"]})
    blended = blend.blend(
        prompt="3",
        weights={"bold": 1.0},
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=4,
        output_type="pt",
    ).images
    plain = digits.load_pipeline()
    plain.load_lora_weights(str(digits.basis_models()["bold"]))
    assert torch.allclose(blended, _draw(plain, "3"), atol=1e-5)
    assert not torch.allclose(blended, _draw(pipe, "3"), atol=1e-3)


# --------------------------------------------------------------------------------------------------------- CLI
def test_generate_uses_the_embedded_model_by_default(tmp_path):
    began = time.perf_counter()
    result = runner.invoke(
        app,
        [
            "generate",
            "--weights",
            "legible=0.5,bold=0.5",
            "--prompt",
            "3",
            "--out",
            str(tmp_path / "digits.png"),
            "--num-images",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - began < 60
    assert Image.open(tmp_path / "digits.png").size == (32, 32)
    settings = json.loads((tmp_path / "digits.json").read_text())
    assert settings["base"] == "digits (embedded)" and set(settings["basis"]) == {"legible", "bold", "stencil"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--prompt", "12"], "12' is not one"),
        (["--weights", "legible=0.5,sparkle=0.5"], "unknown weight name(s) 'sparkle'"),
        (["--weights", "legible=half"], "'half' (for 'legible') is not a number"),
    ],
)
def test_generate_bad_input_names_it_and_writes_nothing(arguments, message, tmp_path):
    options = {"--weights": "legible=1", "--prompt": "3", "--out": str(tmp_path / "out.png")}
    options.update(dict(zip(arguments[::2], arguments[1::2])))
    result = runner.invoke(app, ["generate", *[item for pair in options.items() for item in pair]])
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_writes_its_pictures_and_moves_each_reward_monotonically(tmp_path):
    began = time.perf_counter()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    seconds = time.perf_counter() - began
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rewards.json", "rewards.png", "sweep.png"]
    assert result.output.split() == [str(tmp_path / name) for name in ("sweep.png", "rewards.png", "rewards.json")]
    assert seconds < 180
    sweep = json.loads((tmp_path / "rewards.json").read_text())["DB-MPA"]
    for reward, direction in (("bold", 1), ("stencil", -1)):  # bold = w, stencil = 1 − w
        for before, after in zip(sweep, sweep[1:]):
            change = direction * (after[reward][0] - before[reward][0])
            assert change > -(before[reward][1] + after[reward][1]), (reward, sweep)


# ------------------------------------------------------------------------------------------------- retraining
@pytest.mark.slow
def test_retraining_reproduces_the_manifest(tmp_path):
    from diffusion_blend.presets.digits.train import reproduce

    expected = digits.manifest()["reproduction"]
    measured = reproduce(tmp_path)
    assert measured["classifier"]["held_out_accuracy"] == pytest.approx(
        expected["classifier"]["held_out_accuracy"], abs=expected["tolerance"]["accuracy"]
    )
    for key in ("finetuned_reward", "reward_gain"):
        assert measured["basis"][key] == pytest.approx(expected["basis"][key], abs=expected["tolerance"]["reward"])
