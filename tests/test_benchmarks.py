"""The speed benchmark: a smoke run in the default suite; the CPU targets as opt-in timing tests
(``python -m pytest -m benchmark``: timings on a shared machine are too noisy to gate every CI run)."""

import sys
from pathlib import Path

import pytest
import torch

import blend_speed

RATIOS = (
    "mpa_over_single",
    "ls_over_single",
    "overhead",
    "sequential_overhead",
    "memory",
    "peak_memory",
    "peak_memory_chunked",
    "launches_mpa_over_single",
    "launches_ls_over_single",
)


def test_benchmark_reports_every_ratio():
    result = blend_speed.run("tiny", members=2, repeats=1, warmup=0)
    assert all(result[key] > 0 for key in RATIOS)


def test_benchmark_json_cli(capsys):
    blend_speed.main(["--config", "tiny", "--repeats", "1", "--warmup", "0", "--json", "--members", "3"])
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["members"] == 3 and set(RATIOS) <= set(result)


def test_benchmark_cpu_clock_times_on_one_thread_and_gives_the_threads_back():
    threads = torch.get_num_threads()
    result = blend_speed.run("tiny-r8-b2", repeats=1, warmup=0, sequential=False, clock="cpu")
    assert result["overhead"] > 0 and result["threads"] == 1 and (result["batch"], result["clock"]) == (2, "cpu")
    assert torch.get_num_threads() == threads


def test_live_bytes_peak_counts_storages_while_a_tensor_references_them():
    with blend_speed.LiveBytes() as live:
        first = torch.empty(1000)  # 4 000 bytes
        view = first[:10]  # the same storage
        second = torch.empty(2000)  # 12 000 live
        del first  # kept by the view
        third = torch.empty(500)  # 14 000 live: the peak
        del view, second  # 2 000 live
        fourth = torch.empty(3000)  # 14 000 live again
    assert (live.peak, live.live) == (14_000, 14_000)
    del third, fourth
    assert live.live == 0


def test_live_bytes_leaves_out_views_and_in_place_results_of_earlier_tensors():
    weight, x = torch.ones(1000, 1000), torch.ones(8, 1000)
    with blend_speed.LiveBytes() as live:
        weight.t()[:1]
        x.add_(1)
        torch.nn.functional.linear(x, weight)  # transposes the weight (a view), makes 8 × 1000 floats
    assert live.peak == 32_000


def test_chunking_to_the_single_models_rows_bounds_the_peak_memory():
    """Four members stacked hold four times a single model's activations; chunked, about one's."""
    result = blend_speed.run("mid", members=4, repeats=1, warmup=0, latent=8, sequential=False)
    assert result["peak_memory_chunked"] < 1.05 < result["peak_memory"]


@pytest.mark.slow
def test_benchmark_reports_the_compiled_ratios():
    result = blend_speed.run("tiny", members=2, repeats=1, warmup=0, compile="default", compile_backend="eager")
    assert all(
        result[key] > 0
        for key in ("compiled_mpa_over_single", "compiled_ls_over_single", "compiled_overhead", "compile_speedup")
    )


@pytest.mark.benchmark
def test_tiny_stacked_step_costs_at_most_half_the_separate_calls():
    """Base + two LoRA members with λ ≠ 1, where a call's fixed cost dominates."""
    assert blend_speed.run("tiny", members=2, repeats=30)["overhead"] <= 0.5


@pytest.mark.benchmark
def test_host_bound_stacked_step_costs_at_most_half_the_separate_calls():
    """Rank-8 members, two images with CFG (4 rows a plain call, 12 stacked), one step per routing context: a call
    costs its host work, as a GPU's at batch 1. Timed in the timing thread's CPU time (torch on that thread), so that
    the bound holds while other work shares the cores."""
    assert blend_speed.run("tiny-r8-b2", members=2, repeats=40, sequential=False, clock="cpu")["overhead"] <= 0.5


@pytest.mark.benchmark
def test_mid_size_blend_has_no_overhead_beyond_the_member_calls():
    assert blend_speed.run("mid", members=2, repeats=10)["overhead"] <= 1.03


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_a_cpu(tmp_path):
    """The GPU check is run rarely, on borrowed time: its shell script must work the first time. Here it runs whole
    on the CPU with the tiny model (the host-synchronisation count needs CUDA and is left out)."""
    import json
    import os
    import subprocess

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    environment = os.environ | {
        "PYTHON": sys.executable,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_CONFIG": "tiny",
        "GPU_CHECK_STEPS": "1",
        "GPU_CHECK_REPEATS": "1",
        "GPU_CHECK_DTYPE": "fp32",
    }
    out = tmp_path / "out"
    subprocess.run(
        ["bash", str(script), str(out), str(tmp_path / "no-wheels")],
        env=environment,
        check=True,
        capture_output=True,
        timeout=600,
    )
    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(run["members"], run["batch"]) for run in runs] == [(2, 1), (4, 1), (2, 4), (4, 4)]
    assert "full_vmap_overhead" in runs[0] and "sequential_overhead" not in runs[3]
    assert runs[0]["sweep_mixes"] == 4 and runs[0]["sweep_over_separate"] > 0
    assert "device cpu" in (out / "environment.txt").read_text()
    assert "tiny, fp32, cpu, 1 steps per timed run" in (out / "log.txt").read_text()  # the closing summary table
