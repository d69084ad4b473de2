"""The speed benchmark: a smoke run in the default suite; the CPU targets as opt-in timing tests
(``python -m pytest -m benchmark``: timings on a shared machine are too noisy to gate every CI run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import blend_speed  # noqa: E402

RATIOS = ("mpa_over_single", "ls_over_single", "overhead", "sequential_overhead", "memory")


def test_benchmark_reports_every_ratio():
    result = blend_speed.run("tiny", members=2, repeats=1, warmup=0)
    assert all(result[key] > 0 for key in RATIOS)


def test_benchmark_json_cli(capsys):
    blend_speed.main(["--config", "tiny", "--repeats", "1", "--warmup", "0", "--json", "--members", "3"])
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["members"] == 3 and set(RATIOS) <= set(result)


@pytest.mark.slow
def test_benchmark_reports_the_compiled_ratios():
    result = blend_speed.run("tiny", members=2, repeats=1, warmup=0, compile="default", compile_backend="eager")
    assert all(result[key] > 0 for key in ("compiled_mpa_over_single", "compiled_ls_over_single",
                                            "compiled_overhead", "compile_speedup"))


@pytest.mark.benchmark
def test_tiny_stacked_step_costs_at_most_half_the_separate_calls():
    """Base + two LoRA members with λ ≠ 1, where a call's fixed cost dominates."""
    assert blend_speed.run("tiny", members=2, repeats=30)["overhead"] <= 0.5


@pytest.mark.benchmark
def test_mid_size_blend_has_no_overhead_beyond_the_member_calls():
    assert blend_speed.run("mid", members=2, repeats=10)["overhead"] <= 1.03
