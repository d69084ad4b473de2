"""What a user can rely on (docs/reliability.md): calls from several threads each get their own result; non-finite
weights never pass silently; every mistake gets one line that names it, before any work, and nothing is written."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from diffusion_blend import Blend, BlendedDenoiser
from diffusion_blend.cli import app
from diffusion_blend.lab import default_scenario, run_lab
from diffusion_blend.rewards import parse_reward
from helpers import tiny
from helpers.calls import call_kwargs, max_diff
from helpers.processes import generate_args

runner = CliRunner()
WEIGHTS = ({"ir": 1.0, "aes": 0.0}, {"ir": 0.2, "aes": 0.9})


def slow_steps(pipe, step, timestep, callback_kwargs):
    """Stretch every step so that calls started together surely overlap."""
    time.sleep(0.02)
    return callback_kwargs


def in_threads(calls) -> list:
    """Run the calls at once (a barrier releases them together); their results in order."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def run(index, call):
        barrier.wait()
        try:
            results[index] = call()
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


# ------------------------------------------------------------------------------------------------------- threads
def test_one_blend_called_from_two_threads_gives_each_call_its_own_images(sd_loras):
    blend = Blend(tiny.sd_pipeline(), dict(sd_loras))

    def call(weights):
        return lambda: blend.blend(weights=weights, callback_on_step_end=slow_steps, **call_kwargs())

    sequential = [call(weights)() for weights in WEIGHTS]
    assert max_diff(sequential[0].images, sequential[1].images) > 1e-3  # the two calls differ
    together = in_threads([call(weights) for weights in WEIGHTS])
    for alone, concurrent in zip(sequential, together):
        assert max_diff(alone.images, concurrent.images) == 0


def test_two_blends_on_one_pipeline_take_turns(sd_loras):
    pipe = tiny.sd_pipeline()
    first, second = Blend(pipe, {"ir": sd_loras["ir"]}), Blend(pipe, {"aes": sd_loras["aes"]})
    calls = [
        lambda: first.blend(weights={"ir": 1.0}, callback_on_step_end=slow_steps, **call_kwargs()),
        lambda: second.blend(weights={"aes": 1.0}, callback_on_step_end=slow_steps, **call_kwargs()),
    ]
    sequential = [call() for call in calls]
    together = in_threads(calls)
    for alone, concurrent in zip(sequential, together):
        assert max_diff(alone.images, concurrent.images) == 0


# ---------------------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_lora_file_holding_non_finite_values_is_refused_naming_file_and_tensor(sd_loras, tmp_path, value):
    state = safetensors.torch.load_file(sd_loras["ir"])
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, broken)
    with pytest.raises(ValueError, match=f"{broken}.*non-finite.*{key}"):
        Blend(tiny.sd_pipeline(), {"ir": broken})


def test_a_full_member_holding_nan_is_refused_naming_the_parameter():
    member = tiny.unet(1)
    with torch.no_grad():
        member.conv_in.weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*conv_in.weight"):
        Blend(tiny.sd_pipeline(), {"full": member})


@pytest.mark.parametrize(
    ("weights", "kl_scale", "dtype", "message"),
    [
        ({"ir": 1e30}, 1.0, torch.float32, "kl_scale·w\\['ir'\\] = 1e\\+30"),
        ({"ir": 1.0}, 1e308, torch.float32, "kl_scale·w\\['ir'\\] = 1e\\+308"),
        ({"ir": 100.0}, 1.0, torch.float16, "beyond ±65.5"),
    ],
)
def test_coefficients_that_overflow_the_prediction_dtype_are_refused(weights, kl_scale, dtype, message):
    denoiser = BlendedDenoiser(tiny.unet(0).to(dtype), {"ir": tiny.unet(1).to(dtype), "aes": tiny.unet(2).to(dtype)})
    with pytest.raises(ValueError, match=message):
        denoiser.set_blend(weights, kl_scale=kl_scale)


def test_the_largest_representable_coefficients_still_blend():
    denoiser = BlendedDenoiser(tiny.unet(0).half(), {"ir": tiny.unet(1).half()})
    denoiser.set_blend({"ir": 60.0})  # within float16's 65 504 / 1000


def test_generate_stops_at_a_non_finite_step_and_writes_nothing(sd_pipeline_folder, sd_loras, tmp_path, monkeypatch):
    """The CLI checks the latents at every step: a NaN (here planted in the blend's output) exits non-zero."""
    original = BlendedDenoiser._blend

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(BlendedDenoiser, "_blend", poisoned)
    out = tmp_path / "out.png"
    result = runner.invoke(app, generate_args(sd_pipeline_folder, {"ir": sd_loras["ir"]}, out, "--weights", "ir=1"))
    assert result.exit_code != 0 and "non-finite values (NaN or inf) at step 1" in result.output
    assert not out.exists() and not out.with_suffix(".json").exists()


# --------------------------------------------------------------------------------------------------- clear errors
def test_an_empty_weights_list_is_blamed_on_the_weights(sd_loras):
    with pytest.raises(ValueError, match="^weights are an empty list"):
        Blend(tiny.sd_pipeline(), dict(sd_loras)).blend(weights=[], **call_kwargs())


def test_a_basis_given_as_a_list_is_named_as_such():
    with pytest.raises(ValueError, match="basis must be a mapping.*got a list"):
        Blend(tiny.sd_pipeline(), ["a.safetensors"])


def test_a_basis_named_like_a_module_field_is_refused():
    with pytest.raises(ValueError, match="'training' is the name of a torch module attribute"):
        Blend(tiny.sd_pipeline(), {"training": tiny.unet(1)})


def test_lora_metadata_that_is_not_json_names_the_file(sd_loras, tmp_path):
    state = safetensors.torch.load_file(sd_loras["ir"])
    broken = tmp_path / "bad-metadata.safetensors"
    safetensors.torch.save_file(state, broken, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(ValueError, match=f"LoRA metadata in {broken} is not JSON"):
        Blend(tiny.sd_pipeline(), {"ir": broken})


def test_lora_metadata_of_unknown_fields_names_them(sd_loras, tmp_path):
    state = safetensors.torch.load_file(sd_loras["ir"])
    broken = tmp_path / "odd-metadata.safetensors"
    safetensors.torch.save_file(state, broken, metadata={"lora_adapter_metadata": json.dumps({"model_type": "x"})})
    with pytest.raises(ValueError, match="not a LoraConfig \\(unknown fields: model_type\\)"):
        Blend(tiny.sd_pipeline(), {"ir": broken})


def test_a_missing_local_base_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(ValueError, match=f"base '{missing}' does not exist"):
        Blend.from_pretrained(missing, {"ir": tmp_path / "x.safetensors"})


def test_an_argument_the_pipeline_would_ignore_is_refused(sd_loras):
    with pytest.raises(ValueError, match="takes no argument\\(s\\) guidance_sclae"):
        Blend(tiny.sd_pipeline(), dict(sd_loras)).blend(weights=WEIGHTS[0], guidance_sclae=3.0, **call_kwargs())


def test_a_step_count_below_one_is_refused(sd_loras):
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got -1"):
        Blend(tiny.sd_pipeline(), dict(sd_loras)).blend(weights=WEIGHTS[0], **call_kwargs(steps=-1))


def test_an_unknown_reward_in_a_mix_is_named_before_any_model_loads(monkeypatch):
    from diffusion_blend import rewards

    monkeypatch.setattr(rewards, "get_reward", lambda *a, **k: pytest.fail("a reward model was loaded"))
    with pytest.raises(ValueError, match="unknown reward 'foo'"):
        parse_reward("ir=0.5,foo=0.5")


def test_a_user_reward_of_the_wrong_signature_is_named():
    with pytest.raises(ValueError, match="user reward 'os:system' must take \\(images, prompts\\)"):
        parse_reward("os:system")


@pytest.mark.parametrize(("weights", "alpha"), [({"r1": 1e30}, 1.0), ({"r1": 1.0}, 1e-300), ({"r1": 1e300}, 1.0)])
def test_the_lab_refuses_tilts_beyond_its_closed_forms_naming_them(weights, alpha):
    with pytest.raises(ValueError, match="kl_scale·w/α \\(r1: "):
        run_lab(default_scenario().with_alpha(alpha), weights, samples=10, steps=10)


@pytest.mark.parametrize(
    ("out", "message"),
    [("", "--out is empty"), ("/proc/x.png", "--out: cannot write under /proc")],
)
def test_generate_checks_the_output_as_it_will_write_it(tmp_path, out, message):
    result = runner.invoke(app, ["generate", "--weights", "bold=1", "--prompt", "3", "--out", out, "--steps", "1"])
    assert result.exit_code != 0 and message in result.output


def test_a_base_saved_with_its_adapters_is_refused_naming_the_file(sd_loras, tmp_path):
    """diffusers would load such a folder's adapted layers with random weights, silently."""
    pipe = tiny.sd_pipeline()
    pipe.load_lora_weights(str(sd_loras["ir"]), adapter_name="kept")
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="unet.*holds LoRA adapter weights .*saved with adapters loaded"):
        Blend.from_pretrained(tmp_path / "saved", {"aes": sd_loras["aes"]})


def test_a_scheduler_that_does_not_fit_the_pipeline_is_one_line(sd_pipeline_folder, sd_loras, tmp_path):
    out = tmp_path / "out.png"
    arguments = generate_args(sd_pipeline_folder, {"ir": sd_loras["ir"]}, out, "--weights", "ir=1")
    result = runner.invoke(app, [*arguments, "--scheduler", "flow-euler"])
    assert result.exit_code != 0
    assert "--scheduler FlowMatchEulerDiscreteScheduler does not fit StableDiffusionPipeline" in result.output
    assert not out.exists()


def test_a_mistyped_option_is_one_line_on_stderr():
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_blend", "generate", "--stpes", "3"], capture_output=True, text=True
    )
    assert result.returncode == 2 and not result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: No such option: --stpes (Possible options: --dtype, --seed, --steps) (see ")
    assert line.endswith(" generate --help)")


def test_generate_shows_its_progress_from_the_first_step(sd_pipeline_folder, sd_loras, tmp_path, monkeypatch):
    """On a terminal, whatever the step count: the bar is drawn before the first step ends."""
    import io

    import rich.console

    screen = io.StringIO()
    terminal = functools.partial(rich.console.Console, file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(rich.console, "Console", lambda *args, **kwargs: terminal())
    seen_before_first_step = []
    original = BlendedDenoiser._blend

    def first(self, *args, **kwargs):
        seen_before_first_step.append("denoising" in screen.getvalue())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlendedDenoiser, "_blend", first)
    result = runner.invoke(
        app, generate_args(sd_pipeline_folder, {"ir": sd_loras["ir"]}, tmp_path / "o.png", "--weights", "ir=1")
    )
    assert result.exit_code == 0, result.output
    assert seen_before_first_step and seen_before_first_step[0] and "0/3" in screen.getvalue()
