"""`diffusion-blend generate`: images + a JSON sidecar that reproduces them; bad input is one line, exit != 0,
and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffusion_blend.cli import app
from helpers.processes import generate_args

runner = CliRunner()


def _generate(base, basis, out, *extra):
    return runner.invoke(app, generate_args(base, basis, out, *extra))


def test_grid_and_sidecar(sd_pipeline_folder, sd_loras, tmp_path):
    result = _generate(
        sd_pipeline_folder,
        sd_loras,
        tmp_path / "grid.png",
        "--weights",
        "ir=0.3,aes=0.7",
        "--num-images",
        "3",
        "--seed",
        "5",
        "--guidance",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "grid.png").size == (2 * 16, 2 * 16)  # 3 images in a 2×2 grid
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert settings["weights"] == {"ir": 0.3, "aes": 0.7}
    assert settings["seed"] == 5 and settings["steps"] == 3 and settings["guidance"] == 4.0
    assert settings["scheduler"]["class"] == "DDIMScheduler" and settings["denoiser"] == "unet"
    assert settings["outputs"] == ["grid.png"]


def test_repeated_weights_sweep_in_one_batch_a_row_each(sd_pipeline_folder, sd_loras, tmp_path):
    """Each row of the grid is the run of that setting alone (image j from seed + j in every row)."""
    settings = ("ir=1,aes=0", "ir=0.2,aes=0.8", "ir=0.6,aes=0.4")
    args = ("--num-images", "2", "--seed", "4", "--kl-scale", "1.3")
    result = _generate(
        sd_pipeline_folder,
        sd_loras,
        tmp_path / "sweep.png",
        *args,
        *(part for setting in settings for part in ("--weights", setting)),
    )
    assert result.exit_code == 0, result.output
    sweep = np.asarray(Image.open(tmp_path / "sweep.png")).astype(int)
    assert sweep.shape[:2] == (3 * 16, 2 * 16)  # a row per setting
    for row, setting in enumerate(settings):
        assert (
            _generate(sd_pipeline_folder, sd_loras, tmp_path / f"{row}.png", *args, "--weights", setting).exit_code == 0
        )
        alone = np.asarray(Image.open(tmp_path / f"{row}.png")).astype(int)
        assert np.abs(sweep[16 * row : 16 * (row + 1)] - alone).max() <= 1  # (8-bit rounding of another batch size)
    assert json.loads((tmp_path / "sweep.json").read_text())["weights"][1] == {"ir": 0.2, "aes": 0.8}


def test_repeated_kl_scales_sweep_with_the_weights_a_row_per_pair(sd_pipeline_folder, sd_loras, tmp_path):
    """Rows in the order of the (weights, λ) pairs: weights first, then λ; each the run of that pair alone."""
    pairs = [("ir=1", "0.5"), ("ir=1", "2"), ("aes=1", "0.5"), ("aes=1", "2")]
    args = ("--weights", "ir=1", "--weights", "aes=1", "--kl-scale", "0.5", "--kl-scale", "2", "--seed", "1")
    result = _generate(sd_pipeline_folder, sd_loras, tmp_path / "sweep.png", *args)
    assert result.exit_code == 0, result.output
    sweep = np.asarray(Image.open(tmp_path / "sweep.png")).astype(int)
    assert sweep.shape[:2] == (4 * 16, 16)
    for row, (weights, kl_scale) in enumerate(pairs):
        alone_args = ("--weights", weights, "--kl-scale", kl_scale, "--seed", "1")
        assert _generate(sd_pipeline_folder, sd_loras, tmp_path / f"{row}.png", *alone_args).exit_code == 0
        alone = np.asarray(Image.open(tmp_path / f"{row}.png")).astype(int)
        assert np.abs(sweep[16 * row : 16 * (row + 1)] - alone).max() <= 1
    assert json.loads((tmp_path / "sweep.json").read_text())["kl_scale"] == [0.5, 2.0]


def test_folder_output_is_reproducible(sd_pipeline_folder, sd_loras, tmp_path):
    for run in ("first", "second"):
        result = _generate(
            sd_pipeline_folder,
            sd_loras,
            tmp_path / run,
            "--weights",
            "ir=0.5,aes=0.5",
            "--mode",
            "stochastic",
            "--num-images",
            "2",
            "--scheduler",
            "euler",
        )
        assert result.exit_code == 0, result.output
    for index in range(2):
        first = np.asarray(Image.open(tmp_path / "first" / f"image-{index:03d}.png"))
        second = np.asarray(Image.open(tmp_path / "second" / f"image-{index:03d}.png"))
        assert np.array_equal(first, second)
    assert (
        json.loads((tmp_path / "first" / "settings.json").read_text())["scheduler"]["class"] == "EulerDiscreteScheduler"
    )


def _with_and_without(folder, loras, tmp_path, option: str, value: str):
    """The same blend's image generated without and with an evaluation option, and the second run's settings."""
    args = ("--weights", "ir=0.4,aes=0.6", "--kl-scale", "1.5", "--seed", "3")
    assert _generate(folder, loras, tmp_path / "without.png", *args).exit_code == 0
    result = _generate(folder, loras, tmp_path / "with.png", *args, option, value)
    assert result.exit_code == 0, result.output
    without, with_option = (
        np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int) for name in ("without", "with")
    )
    return without, with_option, json.loads((tmp_path / "with.json").read_text())


def test_max_batch_size_input_gives_the_same_image(sd_pipeline_folder, sd_loras, tmp_path):
    stacked, chunked, settings = _with_and_without(sd_pipeline_folder, sd_loras, tmp_path, "--max-batch-size", "input")
    assert np.abs(stacked - chunked).max() <= 1  # rows evaluated in other batch sizes: float rounding at most
    assert settings["max_batch_size"] == "input"


def test_cli_image_equals_the_python_api(sd_pipeline_folder, sd_loras, tmp_path):
    import torch

    from diffusion_blend import Blend

    result = _generate(
        sd_pipeline_folder,
        sd_loras,
        tmp_path / "one.png",
        "--weights",
        "ir=1",
        "--kl-scale",
        "0.5",
        "--seed",
        "2",
        "--guidance",
        "3",
    )
    assert result.exit_code == 0, result.output
    blend = Blend.from_pretrained(sd_pipeline_folder, basis=sd_loras)
    expected = blend.blend(
        weights={"ir": 1.0},
        kl_scale=0.5,
        prompt="a red cat",
        num_inference_steps=3,
        guidance_scale=3.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(2),
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(expected))


def test_lora_scale_gives_the_python_api_image_at_that_scale(sd_pipeline_folder, sd_loras, tmp_path):
    import torch

    from diffusion_blend import Blend

    result = _generate(
        sd_pipeline_folder,
        sd_loras,
        tmp_path / "one.png",
        "--weights",
        "ir=0.4,aes=0.6",
        "--seed",
        "2",
        "--lora-scale",
        "0.5",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "one.json").read_text())["lora_scale"] == 0.5
    blend = Blend.from_pretrained(sd_pipeline_folder, basis=sd_loras)
    kwargs = dict(prompt="a red cat", num_inference_steps=3, height=16, width=16)
    scaled, unscaled = (
        blend.blend(
            weights={"ir": 0.4, "aes": 0.6},
            cross_attention_kwargs=attention_kwargs,
            generator=torch.Generator().manual_seed(2),
            **kwargs,
        ).images[0]
        for attention_kwargs in ({"scale": 0.5}, None)
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(scaled))
    assert not np.array_equal(np.asarray(scaled), np.asarray(unscaled))


def test_lora_scale_without_a_lora_basis_is_one_line_before_loading(tmp_path):
    from helpers import tiny

    tiny.unet(5).save_pretrained(tmp_path / "member")
    result = _generate(
        tmp_path / "no-model",
        {"ir": tmp_path / "member"},
        tmp_path / "out.png",
        "--weights",
        "ir=1",
        "--lora-scale",
        "0.5",
    )  # (the base does not exist: the check comes first)
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        "error: --lora-scale scales LoRA basis models, and no --basis is a LoRA"
    ]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_generate_compiled_gives_the_eager_image(sd_pipeline_folder, sd_loras, tmp_path):
    eager, compiled, settings = _with_and_without(sd_pipeline_folder, sd_loras, tmp_path, "--compile", "default")
    assert np.abs(eager - compiled).max() <= 1  # float rounding of fused kernels may move a pixel by one level
    assert settings["compile"] == "default"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "ir=0.5,style=0.5"], "unknown weight name"),
        (["--weights", "ir=nan"], "finite"),
        (["--weights", "ir=inf"], "finite"),
        (["--weights", "ir0.5"], "is not NAME=NUMBER"),
        (["--weights", "ir=1", "--kl-scale", "-1"], "kl_scale must be"),
        (["--weights", "ir=0.6,aes=0.6", "--mode", "stochastic"], "sum to 1"),
        (["--weights", "ir=1", "--mode", "average"], "--mode must be"),
        (["--weights", "ir=1", "--dtype", "fp8"], "--dtype must be"),
        (["--weights", "ir=1", "--scheduler", "nonsense"], "unknown scheduler"),
        (["--weights", "ir=1", "--compile", "fastest"], "--compile must be"),
        (["--weights", "ir=1", "--max-batch-size", "0"], "--max-batch-size must be"),
        (["--weights", "ir=1", "--max-batch-size", "half"], "--max-batch-size must be"),
        (["--weights", "ir=1", "--lora-scale", "nan"], "--lora-scale must be a finite number"),
        (["--weights", "ir=1", "--denoiser", "nope"], "has no module 'nope' to blend"),
        (["--weights", "ir=1", "--guidance", "nan"], "--guidance must be a finite number"),
        (["--weights", "ir=1", "--seed", str(2**64)], "--seed must be in [0, 2**64 - --num-images]"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(sd_pipeline_folder, sd_loras, tmp_path, extra, message):
    result = _generate(sd_pipeline_folder, sd_loras, tmp_path / "out.png", *extra)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_height_without_width_is_refused(sd_pipeline_folder, sd_loras, tmp_path):
    """(diffusers would silently use its default size for both.)"""
    result = runner.invoke(
        app,
        [
            "generate",
            "--base",
            str(sd_pipeline_folder),
            "--basis",
            f"ir={sd_loras['ir']}",
            "--weights",
            "ir=1",
            "--prompt",
            "a",
            "--height",
            "32",
            "--out",
            str(tmp_path / "o.png"),
        ],
    )
    assert result.exit_code != 0 and "--height and --width go together" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "out, message",
    [
        ("car.txt", "is neither an image file (.png, .jpg, .jpeg, .webp) nor a folder"),
        ("earlier", "holds an earlier run's outputs (image-000.png, settings.json)"),
        ("clash.png", "the settings file"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_generating(
    sd_pipeline_folder, sd_loras, tmp_path, out, message
):
    """A folder holding an earlier run's images (its stale ones would mix with the new ones), a settings file
    that is a folder, a file that is neither an image nor a folder."""
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "image-000.png").write_bytes(b"")
    (tmp_path / "earlier" / "settings.json").write_text("{}")
    (tmp_path / "clash.json").mkdir()
    before = sorted(tmp_path.rglob("*"))
    result = _generate(sd_pipeline_folder, sd_loras, tmp_path / out, "--weights", "ir=1")
    assert result.exit_code != 0 and message in result.stderr, result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failure_while_writing_leaves_nothing(sd_pipeline_folder, sd_loras, tmp_path, monkeypatch):
    """The second of three images fails to save: neither the first, nor the settings, nor the new folder remain."""
    saved, save = [], Image.Image.save

    def save_twice_then_fail(image, *args, **kwargs):
        saved.append(1)
        if len(saved) == 2:
            raise OSError("disk full")
        return save(image, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_twice_then_fail)
    result = _generate(sd_pipeline_folder, sd_loras, tmp_path / "new" / "run", "--weights", "ir=1", "--num-images", "3")
    assert result.exit_code != 0 and "disk full" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_name_ending_in_a_slash_is_a_folder_whatever_its_suffix(sd_pipeline_folder, sd_loras, tmp_path):
    result = _generate(sd_pipeline_folder, sd_loras, f"{tmp_path / 'w0.5'}/", "--weights", "ir=1")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "w0.5").iterdir()) == ["image-000.png", "settings.json"]


def test_a_jpeg_grid_and_paths_alone_on_stdout(sd_pipeline_folder, sd_loras, tmp_path):
    result = _generate(sd_pipeline_folder, sd_loras, tmp_path / "car.jpg", "--weights", "ir=1", "--num-images", "2")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "car.jpg").format == "JPEG"
    assert result.stdout.splitlines() == [str(tmp_path / "car.jpg"), str(tmp_path / "car.json")]


def test_the_settings_record_local_paths_absolute(sd_pipeline_folder, sd_loras, tmp_path, monkeypatch):
    """(So that a run can be redone from another folder.)"""
    monkeypatch.chdir(sd_loras["ir"].parent)
    result = _generate(sd_pipeline_folder, {"ir": sd_loras["ir"].name}, tmp_path / "o.png", "--weights", "ir=1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o.json").read_text())["basis"] == {"ir": str(sd_loras["ir"].resolve())}


def test_missing_basis_path_is_one_line(sd_pipeline_folder, tmp_path):
    result = _generate(sd_pipeline_folder, {"ir": tmp_path / "nope"}, tmp_path / "out.png", "--weights", "ir=1")
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [f"error: basis 'ir': {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "out.png").exists()


def test_corrupt_basis_is_one_line(sd_pipeline_folder, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    result = _generate(
        sd_pipeline_folder, {"ir": tmp_path / "bad.safetensors"}, tmp_path / "out.png", "--weights", "ir=1"
    )
    assert result.exit_code != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "not a valid safetensors file" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_missing_base_model_is_one_line(sd_loras, tmp_path):
    result = _generate(tmp_path / "no-model", sd_loras, tmp_path / "out.png", "--weights", "ir=1")
    assert result.exit_code != 0
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out.png").exists()


def test_a_basis_given_per_denoiser_is_the_basis_on_that_denoiser(sd_pipeline_folder, sd_loras, tmp_path):
    """NAME@DENOISER=PATH (how Wan 2.2's two experts each get a LoRA); on a one-denoiser pipeline, the same image."""
    args = ("--weights", "ir=0.4,aes=0.6", "--seed", "3")
    assert _generate(sd_pipeline_folder, sd_loras, tmp_path / "plain.png", *args).exit_code == 0
    result = _generate(
        sd_pipeline_folder, {f"{name}@unet": path for name, path in sd_loras.items()}, tmp_path / "per.png", *args
    )
    assert result.exit_code == 0, result.output
    plain, per = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "per"))
    assert np.array_equal(plain, per)
    assert json.loads((tmp_path / "per.json").read_text())["basis"]["ir"] == {"unet": str(sd_loras["ir"])}


def test_a_basis_path_base_is_the_pipelines_own_denoiser():
    """(Wan 2.2: a basis fine-tuned on the low-noise expert only.) A folder called base is ./base."""
    from diffusion_blend.cli.parsing import parse_basis

    assert parse_basis(["aes@transformer=base", "aes@transformer_2=low", "ir=./base"]) == {
        "aes": {"transformer": None, "transformer_2": "low"},
        "ir": "./base",
    }


@pytest.mark.parametrize(
    "item, message",
    [
        ("ir@=x", "is not NAME=PATH or NAME@DENOISER=PATH"),
        ("ir=x --basis ir@unet=y", "'ir' for unet is given twice"),
        ("ir@unet=base --basis ir@unet=y", "'ir' for unet is given twice"),
        ("ir@unet=base", "basis 'ir' leaves every denoiser unchanged"),
    ],
)
def test_bad_per_denoiser_basis_is_one_line(sd_pipeline_folder, tmp_path, item, message):
    args = [
        "generate",
        "--base",
        str(sd_pipeline_folder),
        "--prompt",
        "a",
        "--out",
        str(tmp_path / "o.png"),
        "--weights",
        "ir=1",
    ]
    for part in item.split(" --basis "):
        args += ["--basis", part]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and message in result.stderr


@pytest.mark.parametrize(
    "build, expected",
    [
        ("sd_pipeline", ("guidance_scale", 4.0)),
        ("flux_pipeline", ("guidance_scale", 4.0)),  # guidance distilled into FLUX.1-dev's embedding
        ("qwen_pipeline", ("true_cfg_scale", 4.0)),  # its guidance_scale feeds an embedding only distilled models have
    ],
)
def test_guidance_sets_the_pipelines_classifier_free_guidance(build, expected):
    from diffusion_blend.cli.pipeline_call import call_defaults_of, guidance_setting
    from helpers import tiny

    pipe = getattr(tiny, build)()
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert guidance_setting(4.0, " ", pipe, call_defaults_of(pipe), denoiser) == expected


def test_true_cfg_guidance_without_a_negative_prompt_is_refused():
    from diffusion_blend.cli.pipeline_call import call_defaults_of, guidance_setting
    from diffusion_blend.cli.running import CommandError
    from helpers import tiny

    pipe = tiny.qwen_pipeline()
    defaults = call_defaults_of(pipe)
    with pytest.raises(CommandError, match="--guidance for QwenImagePipeline is its true classifier-free guidance"):
        guidance_setting(4.0, None, pipe, defaults, pipe.transformer)
    assert guidance_setting(None, None, pipe, defaults, pipe.transformer) == ("true_cfg_scale", 4.0)  # its default
