"""The lab's closed forms against independent computations, and the blend's Jensen gap where it is known."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from typer.testing import CliRunner

from diffusion_blend.cli import app
from diffusion_blend.lab import (
    ExactDenoiser,
    GaussianMixture,
    QuadraticReward,
    Scenario,
    default_scenario,
    initial_noise,
    load_scenario,
    make_scheduler,
    run_lab,
    sample,
)

F64 = torch.float64
runner = CliRunner()


def _mixture_moments(mixture: GaussianMixture):
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    second = (
        mixture.weights[:, None, None] * (mixture.covs + mixture.means[:, :, None] * mixture.means[:, None, :])
    ).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def _quadratic_reward():
    return QuadraticReward(torch.tensor([0.7, -0.4], dtype=F64), torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=F64))


def test_tilt_matches_importance_reweighted_base_samples():
    base, reward, alpha = default_scenario().base, _quadratic_reward(), 0.8
    x = base.sample(1_000_000, torch.Generator().manual_seed(0))
    weights = torch.softmax(reward(x) / alpha, dim=0)
    weighted_mean = (weights[:, None] * x).sum(0)
    centred = x - weighted_mean
    weighted_cov = (weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
    tilted = base.tilted(reward, alpha)
    mean, cov = _mixture_moments(tilted)
    assert torch.allclose(mean, weighted_mean, atol=0.02)
    assert torch.allclose(cov, weighted_cov, atol=0.03)
    assert abs(tilted.expected(reward) - float((weights * reward(x)).sum())) < 0.02


def test_tilt_reweights_the_components():
    """r = x₁ at α = 1 moves mass to the components with μ₁ = +2 by the ratio e^{2}/e^{-2} of their normalisers."""
    tilted = default_scenario().base.tilted(QuadraticReward.linear([1.0, 0.0]), 1.0)
    right = tilted.weights[tilted.means[:, 0] > 0].sum()
    assert math.isclose(float(right), math.exp(2) / (math.exp(2) + math.exp(-2)), rel_tol=1e-12)


@pytest.mark.parametrize("timestep", [0, 150, 500.0, 731.4, 999])
def test_epsilon_matches_autograd_of_the_log_density(timestep):
    scenario = default_scenario()
    alpha_bars = make_scheduler(scenario.schedule).alphas_cumprod
    target = scenario.base.tilted(_quadratic_reward(), 0.7)
    denoiser = ExactDenoiser(target, alpha_bars)
    alpha_bar = denoiser.alpha_bar(timestep)
    noised = MixtureSameFamily(  # written independently with torch.distributions
        Categorical(probs=target.weights),
        MultivariateNormal(
            math.sqrt(alpha_bar) * target.means, alpha_bar * target.covs + (1 - alpha_bar) * torch.eye(2, dtype=F64)
        ),
    )
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(noised.log_prob(x).sum(), x)
    assert torch.allclose(denoiser(x.detach(), torch.tensor(timestep)), -math.sqrt(1 - alpha_bar) * grad, atol=1e-10)


def test_integer_timesteps_use_the_schedule_exactly():
    scenario = default_scenario()
    alpha_bars = make_scheduler(scenario.schedule).alphas_cumprod
    denoiser = ExactDenoiser(scenario.base, alpha_bars)
    assert math.isclose(denoiser.alpha_bar(torch.tensor(417)), float(alpha_bars[417]), rel_tol=1e-6)


def test_oracle_sampling_reproduces_exact_expectations():
    """200 DDIM steps, 20 000 samples, the default scenario: every reward within 0.03 of its exact mean."""
    scenario = default_scenario()
    target = scenario.base.tilted(
        QuadraticReward.linear([0.5, 0.5]),
        scenario.alpha,  # 0.5·r1 + 0.5·r2
    )
    oracle = ExactDenoiser(target, make_scheduler(scenario.schedule).alphas_cumprod)
    start = initial_noise(make_scheduler(scenario.schedule), 200, 20_000, target, "exact", seed=0)
    x, _ = sample(oracle, make_scheduler(scenario.schedule), start, 200)
    for name, reward in scenario.rewards.items():
        assert abs(float(reward(x).mean()) - target.expected(reward)) < 0.03, name


def _single_gaussian() -> Scenario:
    base = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), torch.tensor([[[0.6, 0.2], [0.2, 0.4]]]))
    return Scenario(base, {"r1": QuadraticReward.linear([1.0, 0.0]), "r2": QuadraticReward.linear([0.3, 1.0])})


@pytest.mark.parametrize("weights, kl_scale", [({"r1": 0.5, "r2": 0.5}, 1.0), ({"r1": 0.2, "r2": 0.5}, 1.7)])
def test_blend_is_exact_for_a_gaussian_base_and_linear_rewards(weights, kl_scale):
    report = run_lab(_single_gaussian(), weights, kl_scale, samples=2000, steps=50, methods=("blend",))
    assert report["jensen_gap"]["mean_sq"] < 1e-24


def test_jensen_gap_grows_as_alpha_shrinks_on_the_default_mixture():
    gaps = [
        run_lab(
            default_scenario().with_alpha(alpha), {"r1": 0.5, "r2": 0.5}, samples=2000, steps=50, methods=("blend",)
        )["jensen_gap"]["mean_sq"]
        for alpha in (4.0, 2.0, 1.0, 0.5, 0.25)
    ]
    assert gaps[0] > 1e-6  # far above numerical noise, unlike the Gaussian case
    assert all(a < b for a, b in zip(gaps, gaps[1:])), gaps


def test_default_run_of_20000_samples_takes_under_a_minute():
    start = time.perf_counter()
    result = runner.invoke(app, ["lab", "run", "--weights", "r1=0.5,r2=0.5", "--json"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 60


def test_lab_run_json_is_one_object_with_the_documented_keys():
    result = runner.invoke(
        app,
        [
            "lab",
            "run",
            "--weights",
            "r1=0.3,r2=0.7",
            "--kl-scale",
            "1.5",
            "--samples",
            "500",
            "--steps",
            "20",
            "--eta",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"alpha", "weights", "kl_scale", "exact", "methods", "jensen_gap"} <= set(report)
    assert set(report["methods"]) == {"oracle", "base", "joint", "db-mpa-ls"}
    assert all({"r1", "r2", "distance"} <= set(values) for values in report["methods"].values())
    assert len(report["jensen_gap"]["per_step"]) == 20


def test_lab_run_prints_a_table_without_json():
    result = runner.invoke(app, ["lab", "run", "--weights", "r1=1", "--samples", "300", "--steps", "10"])
    assert result.exit_code == 0, result.output
    assert "oracle" in result.stdout and "db-mpa" in result.stdout and "Jensen gap" in result.stdout
    assert "E[r1]" in result.stdout and "E[r2]" in result.stdout  # (not taken for rich markup)


def test_lab_run_bad_weights_is_one_line():
    result = runner.invoke(app, ["lab", "run", "--weights", "r1=0.5,r9=0.5", "--samples", "300"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == ["error: unknown weight name(s) 'r9'; the basis is r1, r2"]


def test_lab_sweep_writes_table_and_plots(tmp_path):
    result = runner.invoke(
        app,
        [
            "lab",
            "sweep",
            "--out",
            str(tmp_path / "sweep"),
            "--alphas",
            "1,0.5",
            "--kl-scales",
            "1",
            "--points",
            "3",
            "--samples",
            "300",
            "--steps",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {row["scenario"] for row in rows} == {"grid-2d", "grid-3d"}
    assert (tmp_path / "sweep" / "sweep.csv").read_text().startswith("scenario,alpha,kl_scale")
    assert "| grid-2d | 0.5 | 1 | r1=0.5, r2=0.5 | db-mpa |" in (tmp_path / "sweep" / "summary.md").read_text()
    for plot in ("fronts.png", "gap_vs_alpha.png"):
        assert (tmp_path / "sweep" / plot).read_bytes()[:4] == b"\x89PNG"


def test_lab_sweep_summary_of_a_grid_without_equal_weights_has_the_nearest(tmp_path, monkeypatch):
    """Four points along two rewards: (2/3, 1/3) and (1/3, 2/3) beside the missing middle; the gap plot draws the
    first of them."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure) or save(figure, *args, **kwargs)
    )
    result = runner.invoke(
        app,
        [
            "lab",
            "sweep",
            "--out",
            str(tmp_path / "sweep"),
            "--alphas",
            "1",
            "--kl-scales",
            "1",
            "--points",
            "4",
            "--no-three-rewards",
            "--samples",
            "300",
            "--steps",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| grid-2d | 1 | 1 | r1=0.667, r2=0.333 | db-mpa |" in summary
    assert "| grid-2d | 1 | 1 | r1=0.333, r2=0.667 | db-mpa |" in summary
    assert "r1=1, r2=0 |" not in summary
    gap = next(figure.axes[0] for figure in figures if figure.axes[0].get_title().startswith("grid-2d, weights"))
    assert gap.get_title() == "grid-2d, weights r1=0.333, r2=0.667" and len(gap.get_lines()) >= 1


def test_scenario_from_yaml(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "alpha: 0.5\nbase:\n  means: [[1, 0], [-1, 0]]\n  covariance: 0.2\n"
        "rewards:\n  up: {b: [0, 1]}\n  tight: {b: [0, 0], A: [[1, 0], [0, 1]]}\n"
    )
    scenario = load_scenario(tmp_path / "s.yaml")
    assert scenario.alpha == 0.5 and list(scenario.rewards) == ["up", "tight"]
    assert torch.allclose(scenario.base.covs[1], 0.2 * torch.eye(2, dtype=F64))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"base": {"means": [[0, 0]]}, "rewards": {"r": {"b": [1, 0, 0]}}}', "3-dimensional, the base 2"),
        ('{"base": {"means": [[0, 0]], "covariance": -1}, "rewards": {"r": {"b": [1, 0]}}}', "positive definite"),
        ('{"base": {"means": [[0, 0]]}}', "missing 'rewards'"),
        ('{"base": {"means": [[0, 0]]}, "rewards": {"r": {"b": [1, 0], "A": [[-1, 0], [0, 0]]}}}', "semi-definite"),
        ('{"base": {"means": [[0, 0]]}, "rewards": {"r": {"b": [1, 0]}}, "colour": 1}', "unknown key"),
    ],
)
def test_bad_scenarios_raise(tmp_path, text, message):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_scenario(tmp_path / "s.json")


def test_euler_sampler_also_reaches_the_target():
    scenario = default_scenario()
    report = run_lab(scenario, {"r1": 1.0}, samples=20_000, steps=100, scheduler="euler", methods=("oracle", "blend"))
    for name in scenario.rewards:
        assert abs(report["methods"]["oracle"][name] - report["exact"][name]) < 0.03


def test_ddim_steps_must_divide_the_training_steps():
    with pytest.raises(ValueError, match="steps must divide 1000"):
        run_lab(default_scenario(), {"r1": 1.0}, samples=100, steps=400 - 1)


def test_negative_weights_on_quadratic_rewards_tilt_when_the_total_is_normalisable():
    rewards = {"r1": _quadratic_reward(), "r2": QuadraticReward(torch.tensor([0.0, 1.0]), 0.1 * torch.eye(2))}
    scenario = Scenario(default_scenario().base, rewards)
    report = run_lab(scenario, {"r1": 1.5, "r2": -0.5}, samples=500, steps=20, methods=("oracle", "blend"))
    assert set(report["methods"]) == {"oracle", "db-mpa"}  # λ = 1, Σw = 1: DB-MPA, with a negative weight


def test_a_tilt_that_is_not_normalisable_raises():
    reward = QuadraticReward(torch.zeros(2), -20 * torch.eye(2))
    with pytest.raises(ValueError, match="not normalisable"):
        default_scenario().base.tilted(reward, 1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"base": {"means": [[0, 0]]}, "rewards": [{"b": [1, 0]}]}', "malformed"),
        ('{"base": {"means": [0, 0]}, "rewards": {"r": {"b": [1, 0]}}}', "list of points"),
        (
            '{"base": {"means": [[0, 0]]}, "rewards": {"r": {"b": [1, 0]}}, "schedule": {"train_steps": 0}}',
            "train_steps",
        ),
    ],
)
def test_malformed_scenarios_raise_value_errors(tmp_path, text, message):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_scenario(tmp_path / "s.json")


def test_lab_sweep_checks_every_value_before_running(tmp_path):
    result = runner.invoke(app, ["lab", "sweep", "--out", str(tmp_path / "sweep"), "--kl-scales", "1,nan"])
    assert result.exit_code != 0 and "kl_scale must be" in result.stderr
    assert not (tmp_path / "sweep").exists()
