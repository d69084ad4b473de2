"""The fine-tuner on the lab, where the fine-tuned target is exact: what each method reaches, the saved networks as
basis models, the tempering of weighted-dsm, and resuming its state."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from diffusion_blend import BlendedDenoiser
from diffusion_blend.cli import app
from diffusion_blend.finetune import trainer
from diffusion_blend.finetune.lab import LabTarget, ResidualDenoiser, exact_expectations, lab_finetune, load_lab_model
from diffusion_blend.finetune.weighted_dsm import WeightedDsm, WeightedDsmOptions
from diffusion_blend.lab import default_scenario, make_scheduler, sample

runner = CliRunner()
#: a weighted-dsm run small enough for the default test run
SMALL_DSM = dict(
    method="weighted-dsm",
    steps=12,
    path_steps=20,
    samples=500,
    checkpoint_every=4,
    options={"round_samples": 256, "round_updates": 4, "batch_size": 64},
)


@pytest.mark.slow
@pytest.mark.parametrize("weights, exact", [({"r1": 1.0}, 2.228), ({"r1": 0.5, "r2": 0.5}, 1.673)])
def test_default_method_reaches_the_exact_tilt_within_three_percent(weights, exact):
    report = lab_finetune(default_scenario(), weights)
    assert report["seconds"] < 600
    for name in weights:
        assert report["exact"][name] == pytest.approx(exact, abs=1e-3)
        assert report["achieved"][name] == pytest.approx(exact, rel=0.03), report


def test_adjoint_matching_moves_the_base_towards_the_tilt():
    report = lab_finetune(default_scenario(), {"r1": 1.0}, method="adjoint-matching", steps=30, samples=2000)
    assert report["achieved"]["r1"] > 1.2  # the base's is 0, the exact tilt's 2.228
    assert abs(report["achieved"]["r2"]) < 0.1  # r2 untouched
    assert 0 < report["kl"] < 2 * report["exact_kl"]


def test_weighted_dsm_tempers_until_the_full_tilt():
    scenario = default_scenario().with_alpha(0.25)
    target = LabTarget(scenario, {"r1": 1.0}, steps=20)
    options = WeightedDsmOptions(batch_size=16, round_samples=512, round_updates=1, ess=0.5)
    method = WeightedDsm(target, 0.25, options)
    generator, betas, fractions = torch.Generator().manual_seed(0), [], []
    while method.beta < 4 and len(betas) < 50:
        method.loss(generator)
        betas.append(method.beta)
        fractions.append(method.round_ess)
    assert len(betas) > 1 and betas[-1] == 4  # several rounds, ending at β = 1/α
    assert all(b > a for a, b in zip(betas, betas[1:]))
    assert min(fractions) >= 0.5


def test_saved_network_samples_as_trained_and_serves_as_a_basis(tmp_path):
    scenario = default_scenario()
    report = lab_finetune(scenario, {"r1": 1.0}, method="adjoint-matching", steps=5, samples=500, out=tmp_path)
    model = load_lab_model(tmp_path, scenario)
    scheduler = make_scheduler(scenario.schedule, "ddim")
    start = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alone, _ = sample(model, scheduler, start, 200)
    assert float(alone[:, 0].mean()) == pytest.approx(report["achieved"]["r1"], abs=1e-9)
    base = ResidualDenoiser(model.base)  # a fresh correction is zero: the exact base, in the members' class
    blended = BlendedDenoiser(base, {"r1": model})
    blended.set_blend({"r1": 1.0})
    through_blend, _ = sample(blended, make_scheduler(scenario.schedule, "ddim"), start, 200)
    assert torch.allclose(through_blend, alone, atol=1e-12)


def test_weighted_dsm_resumes_its_rounds_exactly(tmp_path, monkeypatch):
    scenario = default_scenario()
    lab_finetune(scenario, {"r1": 1.0}, out=tmp_path / "whole", **SMALL_DSM)
    original = WeightedDsm.loss
    calls = {"count": 0}

    def dies_at_the_seventh_update(self, generator):
        calls["count"] += 1
        if calls["count"] == 7:
            raise KeyboardInterrupt  # a kill after the checkpoint of update 4, in the second round
        return original(self, generator)

    monkeypatch.setattr(WeightedDsm, "loss", dies_at_the_seventh_update)
    with pytest.raises(KeyboardInterrupt):
        lab_finetune(scenario, {"r1": 1.0}, out=tmp_path / "killed", **SMALL_DSM)
    monkeypatch.setattr(WeightedDsm, "loss", original)
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    lab_finetune(scenario, {"r1": 1.0}, out=tmp_path / "killed", resume=True, **SMALL_DSM)
    resumed, whole = (tmp_path / name / "model.safetensors" for name in ("killed", "whole"))
    assert resumed.read_bytes() == whole.read_bytes()


def test_resume_refuses_other_settings(tmp_path):
    lab_finetune(default_scenario(), {"r1": 1.0}, out=tmp_path, **SMALL_DSM)
    with pytest.raises(ValueError, match="other settings"):
        lab_finetune(default_scenario(), {"r1": 1.0}, out=tmp_path, resume=True, **{**SMALL_DSM, "steps": 13})


def test_exact_expectations_of_the_mix_are_the_closed_form():
    assert exact_expectations(default_scenario(), {"r1": 0.5, "r2": 0.5})["r1"] == pytest.approx(1.67319, abs=1e-5)


def test_cli_prints_one_json_object():
    result = runner.invoke(
        app, ["lab", "finetune", "--method", "adjoint-matching", "--steps", "3", "--samples", "200", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = __import__("json").loads(result.output)
    assert set(report) >= {"alpha", "reward", "method", "exact", "achieved", "seconds"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--reward", "r3=1"], "unknown reward(s) 'r3'"),
        (["--alpha", "-1"], "--alpha must be a finite number > 0"),
        (["--method", "sgd"], "unknown method 'sgd'"),
        (["--resume"], "--resume and --overwrite need --out"),
    ],
)
def test_cli_bad_input(arguments, message):
    result = runner.invoke(app, ["lab", "finetune", *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


def test_trainer_methods_are_the_three():
    assert set(trainer.METHODS) == {"weighted-dsm", "adjoint-matching", "policy-gradient"}
