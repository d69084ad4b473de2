"""The fine-tuner on a tiny random Stable Diffusion pipeline: LoRAs that raise their reward and load as basis models,
the KL they report against a direct computation, runs killed and resumed, two processes, and bad input refused
before any work."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from typer.testing import CliRunner

from diffusion_blend import Blend
from diffusion_blend.cli import app
from diffusion_blend.finetune import finetune
from helpers.processes import cli_env, two_processes

PROMPTS = ["a cat", "a dog"]
runner = CliRunner()
#: a small, fast run: 6 sampler steps, 8 samples per update (the tiny UNet's images vary little, so α is small)
SMALL = dict(alpha=1e-2, steps=20, batch_size=8, lr=1e-2, sampler_steps=6, eval_samples=32, progress=False)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def brightness_run(sd_pipeline_folder, prompts_file, tmp_path_factory) -> tuple[Path, dict]:
    """Adjoint matching for a differentiable reward (the images' brightness)."""
    out = tmp_path_factory.mktemp("bright")
    record = finetune(
        str(sd_pipeline_folder),
        "helpers.finetune_rewards:brightness",
        prompts=prompts_file,
        out=out,
        method="adjoint-matching",
        **SMALL,
    )
    return out, record


def test_adjoint_matching_raises_a_differentiable_reward(brightness_run):
    evaluation = brightness_run[1]["evaluation"]
    assert evaluation["reward_gain"] > 3 * evaluation["reward_gain_se"] > 0


def test_policy_gradient_raises_a_black_box_reward(sd_pipeline_folder, prompts_file, tmp_path):
    record = finetune(
        str(sd_pipeline_folder),
        "helpers.finetune_rewards:redness",
        prompts=prompts_file,
        out=tmp_path,
        method="policy-gradient",
        **{**SMALL, "batch_size": 32, "lr": 3e-2, "steps": 24},
        options={"updates_per_rollout": 2},
    )
    evaluation = record["evaluation"]
    assert evaluation["reward_gain"] > 3 * evaluation["reward_gain_se"] > 0


def test_the_run_folder_loads_in_blend_as_diffusers_loads_the_lora(brightness_run, sd_pipeline_folder):
    out, _ = brightness_run
    call = dict(prompt="a cat", num_inference_steps=3, output_type="np", height=16, width=16)
    blend = Blend.from_pretrained(str(sd_pipeline_folder), basis={"bright": str(out)})
    blended = blend.blend(weights={"bright": 1.0}, generator=torch.Generator().manual_seed(0), **call).images
    plain = StableDiffusionPipeline.from_pretrained(sd_pipeline_folder)
    base = plain(generator=torch.Generator().manual_seed(0), **call).images
    plain.load_lora_weights(str(out))
    with_lora = plain(generator=torch.Generator().manual_seed(0), **call).images
    assert abs(with_lora - base).max() > 1e-3  # the adapter is not a no-op
    assert abs(blended - with_lora).max() < 1e-5


def test_reported_kl_matches_a_direct_computation(brightness_run, sd_pipeline_folder):
    """Replay the closing evaluation's rollouts with diffusers' own DDIM step (η = 1): KL of each step's two
    Gaussians, ‖mean_finetuned − mean_base‖² / 2σ², σ² from the scheduler's variance."""
    out, record = brightness_run
    finetuned = StableDiffusionPipeline.from_pretrained(sd_pipeline_folder)
    finetuned.load_lora_weights(str(out))
    base = StableDiffusionPipeline.from_pretrained(sd_pipeline_folder)
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(SMALL["sampler_steps"])
    samples = SMALL["eval_samples"]
    generator = torch.Generator().manual_seed(record["seed"] + 1)  # the evaluation's seed
    prompts = [PROMPTS[int(i)] for i in torch.randint(len(PROMPTS), (samples,), generator=generator)]
    x = torch.randn(samples, 4, 8, 8, generator=generator)
    with torch.no_grad():
        embeddings, _ = base.encode_prompt(prompts, "cpu", 1, False)
        total = torch.zeros(samples, dtype=torch.float64)
        for timestep in scheduler.timesteps:
            noise = torch.randn(x.shape, generator=generator)
            means = [
                scheduler.step(
                    pipe.unet(x, timestep, encoder_hidden_states=embeddings).sample,
                    timestep,
                    x,
                    eta=1.0,
                    variance_noise=torch.zeros_like(x),
                ).prev_sample
                for pipe in (finetuned, base)
            ]
            previous = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            variance = scheduler._get_variance(timestep, previous)
            if variance > 0:
                total += ((means[0] - means[1]).double() ** 2).flatten(1).sum(1) / (2 * float(variance))
                x = means[0] + variance.sqrt() * noise
            else:
                x = means[1]  # a deterministic step takes the base's prediction
    assert record["evaluation"]["kl"] > 0.1
    assert record["evaluation"]["kl"] == pytest.approx(float(total.mean()), rel=1e-3)


def test_record_says_what_was_trained(brightness_run, sd_pipeline_folder):
    out, record = brightness_run
    written = json.loads((out / "finetune.json").read_text())
    assert written["method"] == "adjoint-matching" and written["alpha"] == SMALL["alpha"]
    assert written["reward"] == "helpers.finetune_rewards:brightness"
    assert written["base"] == str(sd_pipeline_folder.resolve())
    assert written["steps"] == SMALL["steps"] and written["seed"] == 0 and written["version"]
    assert set(written["evaluation"]) >= {"finetuned_reward", "base_reward", "kl"}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, SMALL["steps"] + 1))


# ------------------------------------------------------------------------------------------- kill and resume
def _finetune_command(base: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffusion_blend",
        "finetune",
        "--base",
        str(base),
        "--reward",
        "helpers.finetune_rewards:redness",
        "--alpha",
        "0.01",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--method",
        "policy-gradient",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--sampler-steps",
        "4",
        "--lr",
        "0.01",
        "--checkpoint-every",
        "3",
        "--option",
        "updates_per_rollout=2",
        "--eval-samples",
        "4",
        *extra,
    ]


def test_a_killed_run_resumes_to_the_same_weights(sd_pipeline_folder, prompts_file, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(
        _finetune_command(sd_pipeline_folder, prompts_file, whole), env=cli_env(), check=True, capture_output=True
    )
    process = subprocess.Popen(
        _finetune_command(sd_pipeline_folder, prompts_file, killed),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-0000006").is_dir():  # killed between checkpoints 6 and 12
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    subprocess.run(
        _finetune_command(sd_pipeline_folder, prompts_file, killed, "--resume"),
        env=cli_env(),
        check=True,
        capture_output=True,
    )
    resumed = safetensors.torch.load_file(killed / "pytorch_lora_weights.safetensors")
    uninterrupted = safetensors.torch.load_file(whole / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == uninterrupted.keys() and resumed
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert json.loads((killed / "finetune.json").read_text())["resumed_from"] >= 6


def test_two_processes_hold_the_same_weights_and_write_once(sd_pipeline_folder, prompts_file, tmp_path):
    out = tmp_path / "run"
    command = [*two_processes(29517), *_finetune_command(sd_pipeline_folder, prompts_file, out)[1:]]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("pytorch_lora_weights.safetensors") == 1  # one process reports
    assert json.loads((out / "finetune.json").read_text())["processes"] == 2
    checkpoint = out / "checkpoints" / "step-0000012"
    ranks = [safetensors.torch.load_file(checkpoint / f"rank-{rank}.safetensors") for rank in (0, 1)]
    parameters = [json.loads((checkpoint / f"rank-{rank}.json").read_text())["__dict__"] for rank in (0, 1)]
    keys = [dict((k, v) for k, v in state)["parameters"] for state in parameters]
    assert keys[0] and all(
        torch.equal(ranks[0][a["__tensor__"]], ranks[1][b["__tensor__"]]) for a, b in zip(keys[0], keys[1], strict=True)
    )
    rewards = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 12  # one metrics file, one line per update


# --------------------------------------------------------------------------------------------------- bad input
def _bad(base, prompts, out, **changes) -> list[str]:
    options = {"--base": str(base), "--reward": "jpeg", "--alpha": "0.1", "--prompts": str(prompts), "--out": str(out)}
    options.update(changes)
    return ["finetune", *[item for pair in options.items() for item in pair if pair[1] is not None]]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"--reward": "jpeg,nonsense=1"}, "unknown reward 'nonsense'"),
        ({"--alpha": "0"}, "alpha must be a finite number > 0"),
        ({"--alpha": "nan"}, "alpha must be a finite number > 0"),
        ({"--method": "policy-gradient", "--eta": "0"}, "needs a stochastic sampler"),
        ({"--method": "adjoint-matching"}, "needs a differentiable reward"),
        ({"--method": "sgd"}, "unknown method 'sgd'"),
        ({"--prompts": "missing.txt"}, "cannot read missing.txt"),
        ({"--base": "no/such/folder"}, "neither a local folder nor a hub repository"),
        ({"--log-with": "nosuch"}, "unknown tracker 'nosuch'"),
        ({"--option": "regressed_steps=3"}, "weighted-dsm takes no option regressed_steps"),
        ({"--option": "batch_size=0"}, "batch-size must be a positive integer"),
    ],
)
def test_bad_input_is_refused_before_any_work(changes, message, sd_pipeline_folder, prompts_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, _bad(sd_pipeline_folder, prompts_file, out, **changes))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_tracker_that_is_not_installed_is_refused(sd_pipeline_folder, prompts_file, tmp_path):
    arguments = _bad(sd_pipeline_folder, prompts_file, tmp_path / "run", **{"--log-with": "tensorboard"})
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2 and "pip install tensorboard" in result.output
    assert not (tmp_path / "run").exists()


def test_mixed_precision_and_gradient_checkpointing_train(sd_pipeline_folder, prompts_file, tmp_path):
    record = finetune(
        str(sd_pipeline_folder),
        "helpers.finetune_rewards:brightness",
        prompts=prompts_file,
        out=tmp_path,
        method="adjoint-matching",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        **{**SMALL, "steps": 2, "eval_samples": 4},
    )
    assert record["mixed_precision"] == "bf16" and record["last_metrics"]["grad_norm"] > 0
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_an_empty_prompts_file_is_refused(sd_pipeline_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = runner.invoke(app, _bad(sd_pipeline_folder, empty, tmp_path / "run"))
    assert result.exit_code == 2 and "holds no prompt" in result.output
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_another_run_is_refused(sd_pipeline_folder, prompts_file, tmp_path):
    (tmp_path / "finetune.json").write_text("{}")
    result = runner.invoke(app, _bad(sd_pipeline_folder, prompts_file, tmp_path))
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["finetune.json"]


def test_a_base_without_a_unet_pipeline_is_refused(prompts_file, tmp_path):
    from helpers import tiny

    base = tmp_path / "flux"
    tiny.flux_pipeline().save_pretrained(base)
    result = runner.invoke(app, _bad(base, prompts_file, tmp_path / "run"))
    assert result.exit_code == 2 and "supports Stable Diffusion 1.x/2.x" in result.output, result.output
    assert not (tmp_path / "run").exists()
