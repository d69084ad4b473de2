"""The sweep: its configuration checked before any sampling, its results against the samples they summarise, resuming
and splitting across processes without changing a number."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import diffusion_blend.evaluate.sweep as sweep_module
from diffusion_blend.cli import app
from diffusion_blend.evaluate import ConfigError, load_config, run_sweep
from diffusion_blend.evaluate.config import parse_config, simplex_grid
from diffusion_blend.evaluate.settings import DigitsSetting
from helpers.processes import cli_env, two_processes

runner = CliRunner()
FILES = ("results.json", "samples.csv", "pareto.png", "grid.png", "report.md")
#: what differs between two runs of the same units: the clock and the memory
TIMINGS = ("seconds", "seconds_per_image", "peak_memory_mb")
SMALL = {
    "setting": "digits",
    "rewards": ["bold", "stencil"],
    "weights": [[0, 1], [0.5, 0.5]],
    "methods": [
        "base",
        "db-mpa",
        "db-mpa-ls",
        "soup",
        "soup-published",
        {"name": "code", "candidates": 2, "block": 2},
        {"name": "guidance", "scale": 0.05, "probes": 2},
        "oracle",
        "joint",
    ],
    "kl_scales": [0.5, 1.5],
    "prompts": ["3", "7"],
    "images_per_prompt": 2,
    "steps": 4,
}


def write_config(folder: Path, **changes) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    run_sweep(str(write_config(folder)), str(folder / "out"), progress=False)
    return folder / "out"


def without_timings(results: dict) -> dict:
    for series in results["methods"].values():
        for entry in series:
            for key in TIMINGS:
                entry.pop(key)
    return results


# ---------------------------------------------------------------------------------------------------- the config
def test_the_grid_of_two_rewards_steps_along_the_first_weight():
    assert simplex_grid(2, 0.1) == tuple((i / 10, round(1 - i / 10, 12)) for i in range(11))


def test_the_grid_of_three_rewards_covers_the_simplex():
    points = simplex_grid(3, 0.25)
    assert len(points) == 15 and all(math.isclose(sum(point), 1) for point in points)
    assert len(set(points)) == 15


def test_named_weight_points_fill_in_zeros():
    config = parse_config({**SMALL, "weights": [{"stencil": 1}, {"bold": 0.5, "stencil": 0.5}]})
    assert config.weights == ((0.0, 1.0), (0.5, 0.5))


def test_the_digits_preset_loads():
    config = load_config(preset="digits")
    assert config.setting == "digits" and len(config.weights) == 11
    assert {m.name for m in config.methods} == {
        "base",
        "db-mpa",
        "db-mpa-ls",
        "db-smc",
        "soup",
        "soup-published",
        "code",
        "guidance",
        "oracle",
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"methods": ["base", "blend"]}, "unknown method 'blend'"),
        ({"methods": [{"name": "code", "beams": 3}]}, "takes no option"),
        ({"weights": [[0.5, 0.3, 0.2]]}, "each point needs 2 weights"),
        ({"weights": [{"bold": 1, "sharp": 0}]}, "unknown reward name"),
        ({"weights": [[0.5, -0.5]]}, ">= 0"),
        ({"grid": 0.3, "weights": None}, "divide 1"),
        ({"prompts": "missing.txt"}, "does not exist"),
        ({"setting": "sdxl"}, "setting must be"),
        ({"rewards": ["bold"]}, "two or more"),
        ({"seeds": [-1]}, "seeds"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_configs_are_refused_before_anything_runs(tmp_path, changes, message):
    raw = {**SMALL, **changes}
    raw = {key: value for key, value in raw.items() if value is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rewards": ["bold", "sharp"]}, "no model for reward"),
        ({"methods": [{"name": "oracle", "weights": [[0.1, 0.9]]}]}, "no MORL oracle was fine-tuned at weights"),
        ({"methods": [{"name": "db-mpa-ls", "weights": [[0.5, 0.6]]}]}, "must sum to 1"),
        ({"prompts": ["3", "x"]}, "digit"),
    ],
)
def test_configs_the_setting_cannot_serve_are_refused_before_sampling(tmp_path, monkeypatch, changes, message):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the configuration was checked")

    monkeypatch.setattr(sweep_module, "run_unit", no_sampling)
    with pytest.raises(ConfigError, match=message):
        run_sweep(str(write_config(tmp_path, **changes)), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_cli_reports_a_bad_config_in_one_line_and_writes_nothing(tmp_path):
    result = runner.invoke(
        app, ["sweep", str(write_config(tmp_path, methods=["soups"])), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "unknown method 'soups'" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- the results
def test_a_sweep_writes_every_file(swept):
    assert all((swept / name).is_file() for name in FILES)
    results = json.loads((swept / "results.json").read_text())
    assert set(results["methods"]) == {
        "base",
        "db-mpa",
        "db-mpa-ls",
        "soup",
        "soup-published",
        "code",
        "guidance",
        "oracle",
        "joint λ=0.5",
        "joint λ=1.5",
    }
    assert [entry["kl_scale"] for entry in results["methods"]["joint λ=1.5"]] == [1.5, 1.5]
    assert [entry["weights"] for entry in results["methods"]["oracle"]] == [
        {"bold": 0.25, "stencil": 0.75},
        {"bold": 0.5, "stencil": 0.5},
        {"bold": 0.75, "stencil": 0.25},
    ]


def test_results_summarise_the_samples(swept):
    results = json.loads((swept / "results.json").read_text())
    rows = list(csv.DictReader((swept / "samples.csv").open()))
    for entry in results["methods"]["soup"]:
        mine = [row for row in rows if row["method"] == "soup" and float(row["w_bold"]) == entry["weights"]["bold"]]
        bold = [float(row["bold"]) for row in mine]
        weighted = [
            entry["weights"]["bold"] * float(row["bold"]) + entry["weights"]["stencil"] * float(row["stencil"])
            for row in mine
        ]
        assert len(bold) == 4 and math.isclose(entry["rewards"]["bold"]["mean"], sum(bold) / 4, rel_tol=1e-12)
        assert math.isclose(entry["weighted"]["mean"], sum(weighted) / 4, rel_tol=1e-12)
        spread = math.sqrt(sum((b - sum(bold) / 4) ** 2 for b in bold) / 3 / 4)
        assert math.isclose(entry["rewards"]["bold"]["se"], spread, rel_tol=1e-9)


def test_the_soup_and_the_blend_agree_where_one_basis_model_has_all_the_weight(swept):
    """At w = (0, 1) the soup, DB-MPA and the published soup all sample the stencil basis model alone."""
    results = json.loads((swept / "results.json").read_text())
    at_stencil = [
        next(e for e in results["methods"][m] if e["weights"]["bold"] == 0)
        for m in ("db-mpa", "soup", "soup-published")
    ]
    assert at_stencil[0]["rewards"]["bold"]["mean"] == pytest.approx(at_stencil[1]["rewards"]["bold"]["mean"], abs=1e-3)
    assert at_stencil[1]["rewards"]["bold"]["mean"] == pytest.approx(at_stencil[2]["rewards"]["bold"]["mean"], abs=1e-3)


def test_code_calls_the_denoiser_for_every_candidate(swept):
    results = json.loads((swept / "results.json").read_text())
    base, code = results["methods"]["base"][0], results["methods"]["code"][0]
    assert base["denoiser_rows"] == 4 * 4  # 4 images, 4 steps
    # 2 candidates on every step; the prediction that scores a block's candidates is the next block's first
    assert code["denoiser_rows"] == 4 * 2 * 4


def test_the_report_holds_the_table_at_equal_weights(swept):
    report = (swept / "report.md").read_text()
    assert "## At bold = 0.5, stencil = 0.5" in report and "| MORL oracle |" in report and "pareto.png" in report


# ------------------------------------------------------------------------------------------------------ resuming
def test_a_finished_sweep_reruns_nothing_and_writes_the_same_files(swept, tmp_path, monkeypatch):
    before = {name: (swept / name).read_bytes() for name in FILES}
    monkeypatch.setattr(sweep_module, "run_unit", lambda *a, **k: pytest.fail("a finished unit ran again"))
    run_sweep(str(write_config(tmp_path)), str(swept), progress=False)
    assert {name: (swept / name).read_bytes() for name in FILES} == before


def test_a_resumed_sweep_runs_only_the_missing_units_and_gets_the_same_numbers(swept, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    cells = sorted((swept / "cells").glob("*.json"))
    (out / "cells").mkdir()
    for cell in cells[::2]:  # half the units finished before the interruption
        for suffix in (".json", ".safetensors"):
            (out / "cells" / cell.with_suffix(suffix).name).write_bytes(cell.with_suffix(suffix).read_bytes())
    ran = []
    original = sweep_module.run_unit
    monkeypatch.setattr(
        sweep_module, "run_unit", lambda setting, unit, stem: (ran.append(stem.name), original(setting, unit, stem))
    )
    run_sweep(str(write_config(tmp_path)), str(out), progress=False)
    assert sorted(ran) == sorted(cell.stem for cell in cells[1::2])
    resumed = without_timings(json.loads((out / "results.json").read_text()))
    assert resumed == without_timings(json.loads((swept / "results.json").read_text()))


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_two_processes_give_the_results_of_one(tmp_path):
    config = write_config(tmp_path)
    one = subprocess.run(
        [sys.executable, "-m", "diffusion_blend", "sweep", str(config), "--out", str(tmp_path / "one")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*two_processes(29519), "-m", "diffusion_blend", "sweep", str(config), "--out", str(tmp_path / "two")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("results.json") == 1  # the main process writes and reports
    results = [without_timings(json.loads((tmp_path / run / "results.json").read_text())) for run in ("one", "two")]
    assert results[0] == results[1]
    assert (tmp_path / "one" / "samples.csv").read_text() == (tmp_path / "two" / "samples.csv").read_text()


def test_the_setting_is_built_before_units_are_planned(tmp_path):
    """The oracle's default points come from the setting: the shipped oracles' weights."""
    config = load_config(write_config(tmp_path))
    setting = DigitsSetting(config)
    assert setting.oracle_points() == ((0.25, 0.75), (0.5, 0.5), (0.75, 0.25))


# ----------------------------------------------------------------------------------------------------------- lab
LAB = {
    "setting": "lab",
    "rewards": ["r1", "r2"],
    "weights": [[1, 0], [0.5, 0.5]],
    "images_per_prompt": 300,
    "steps": 20,
    "methods": ["base", "db-mpa", {"name": "code", "candidates": 2, "block": 5}, "guidance", "oracle"],
}


def test_the_lab_front_is_the_closed_form_of_the_tilted_mixture(tmp_path):
    """Four modes N((±2, ±2), 0.3 I), r1 = x₁, α = 1: tilting by exp(x₁) moves each mode by 0.3 along x₁ and weighs
    the modes at x₁ = ±2 by e^{±2}, so E[x₁] = (2.3 e² − 1.7 e⁻²) / (e² + e⁻²)."""
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(LAB))
    run_sweep(str(path), str(tmp_path / "out"), progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    expected = (2.3 * math.exp(2) - 1.7 * math.exp(-2)) / (math.exp(2) + math.exp(-2))
    assert results["exact"][0]["rewards"]["r1"] == pytest.approx(expected, rel=1e-12)
    assert results["exact"][0]["rewards"]["r2"] == pytest.approx(0, abs=1e-12)
    oracle = results["methods"]["oracle"][0]["rewards"]["r1"]
    assert abs(oracle["mean"] - expected) < 4 * oracle["se"] + 0.05  # sampled with 20 steps


def test_the_lab_measures_each_methods_distance_to_its_target(tmp_path):
    """The exact oracle lands near the sampling-noise floor; CoDe (two candidates), with no KL term, farther."""
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(LAB))
    run_sweep(str(path), str(tmp_path / "out"), progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    floor = results["exact"][1]["distance_floor"]
    oracle, code = (results["methods"][name][1]["distance_to_target"] for name in ("oracle", "code"))
    assert 0 < floor and oracle < 3 * floor and code > 2 * max(oracle, floor)
    assert "distance to the target" in (tmp_path / "out" / "report.md").read_text()


def test_the_lab_refuses_a_soup_of_exact_models(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump({**LAB, "methods": ["soup"]}))
    with pytest.raises(ConfigError, match="basis: learned"):
        run_sweep(str(path), str(tmp_path / "out"), progress=False)


def test_the_lab_soup_averages_the_learned_networks(tmp_path):
    import torch

    from diffusion_blend.evaluate.config import Method
    from diffusion_blend.evaluate.lab_setting import LabSetting
    from diffusion_blend.finetune.lab import ResidualDenoiser

    setting = LabSetting(parse_config({**LAB, "basis": "learned", "methods": ["soup"]}), tmp_path)
    members = {}
    for index, name in enumerate(("r1", "r2")):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the fine-tuner's initialisation, then moved as training would
            members[name] = ResidualDenoiser(setting.base)
        with torch.no_grad():
            for parameter in members[name].net.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
    setting._basis = members
    soup = setting.denoiser(Method("soup"), (0.25, 0.75), 1.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = ResidualDenoiser(setting.base)
    with torch.no_grad():
        for name, parameter in expected.net.named_parameters():
            parameter.copy_(
                0.25 * dict(members["r1"].net.named_parameters())[name]
                + 0.75 * dict(members["r2"].net.named_parameters())[name]
            )
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(soup(x, 500), expected(x, 500), atol=1e-6)


def test_the_lab_soup_starts_from_the_fine_tuners_initial_network(tmp_path):
    import torch

    from diffusion_blend.evaluate.lab_setting import LabSetting
    from diffusion_blend.finetune.lab import LabTarget, ResidualDenoiser
    from diffusion_blend.lab.scenario import default_scenario

    setting = LabSetting(parse_config({**LAB, "basis": "learned", "methods": ["soup"]}), tmp_path)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        setting._basis = {"r1": ResidualDenoiser(setting.base), "r2": ResidualDenoiser(setting.base)}
    fine_tuners = LabTarget(default_scenario(), {"r1": 1.0}, seed=0).model
    start = setting.initial_network()
    assert all(torch.equal(a, b) for a, b in zip(start.net.parameters(), fine_tuners.net.parameters(), strict=True))


def test_the_published_prompt_sets_ship_with_the_package():
    from diffusion_blend.evaluate.config import DEFAULT_PROMPT_SET, prompt_sets, read_prompts

    assert prompt_sets() == ["short-color", "short-drawbench", "test", "train"]
    short_drawbench = read_prompts(DEFAULT_PROMPT_SET)
    assert len(short_drawbench) == 1000 and short_drawbench[0] == "A blue colored bear."
    assert len(read_prompts("train")) == 25


# ----------------------------------------------------------------------------------------------------- diffusers
def test_a_diffusers_pipeline_with_lora_basis_models_is_swept(sd_pipeline_folder, sd_loras, tmp_path):
    """The tiny SD pipeline, two random LoRAs, user rewards (one a black box), every method; the soup at a corner
    samples that corner's LoRA alone, as DB-MPA does."""
    raw = {
        "setting": "diffusers",
        "base": str(sd_pipeline_folder),
        "rewards": ["ir", "aes"],
        "basis": {name: str(path) for name, path in sd_loras.items()},
        "oracles": {"ir=0.5,aes=0.5": str(sd_loras["ir"])},
        "reward_models": {"ir": "helpers.finetune_rewards:brightness", "aes": "helpers.finetune_rewards:redness"},
        "weights": [[1, 0], [0.5, 0.5]],
        "prompts": ["a cat", "a dog"],
        "images_per_prompt": 1,
        "steps": 3,
        "guidance_scale": 2.0,
        "methods": [
            "base",
            "db-mpa",
            "soup",
            "soup-published",
            {"name": "code", "candidates": 2, "block": 2},
            {"name": "guidance", "probes": 2},
            "oracle",
        ],
    }
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_sweep(str(path), str(tmp_path / "out"), progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == {"base", "db-mpa", "soup", "soup-published", "code", "guidance", "oracle"}
    corner = [next(e for e in results["methods"][m] if e["weights"]["ir"] == 1) for m in ("db-mpa", "soup")]
    assert corner[0]["rewards"]["ir"]["mean"] == pytest.approx(corner[1]["rewards"]["ir"]["mean"], abs=1e-3)


def test_the_diffusers_setting_needs_a_basis_model_per_reward(sd_pipeline_folder, sd_loras, tmp_path):
    raw = {
        "setting": "diffusers",
        "base": str(sd_pipeline_folder),
        "rewards": ["ir", "sharp"],
        "basis": {name: str(path) for name, path in sd_loras.items()},
        "methods": ["db-mpa"],
        "prompts": ["a"],
    }
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="no model for reward"):
        run_sweep(str(path), str(tmp_path / "out"), progress=False)


def test_a_setting_refuses_another_settings_keys(tmp_path):
    with pytest.raises(ConfigError, match="does not read"):
        parse_config({**SMALL, "scenario": "x.yaml"})
