"""Killed runs lose nothing: ``generate`` and ``sweep`` killed with SIGKILL mid-run leave no output (or only whole
ones), and the rerun gives what an uninterrupted run gives (the sweep resuming where it stopped). The fine-tuner's
kill test lives with the fine-tuner (test_finetune.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.processes import cli_env

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "diffusion_blend"]


def killed_when(command: list[str], ready, timeout: float = 120) -> None:
    """Start ``command``, SIGKILL it once ``ready()`` holds (failing if it ends first)."""
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def generate_command(out: Path, steps: int) -> list[str]:
    return [*CLI, "generate", "--weights", "bold=0.5,stencil=0.5", "--prompt", "3", "--num-images", "2"] + [
        "--steps",
        str(steps),
        "--out",
        f"{out}/",
    ]


def test_generate_killed_mid_run_leaves_nothing_and_the_rerun_is_the_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    began = time.monotonic()
    subprocess.run(generate_command(whole, 300), env=cli_env(), check=True, capture_output=True)
    duration = time.monotonic() - began
    # the start-up (models loaded) takes under half of that run, the 300 steps the rest: killed at three quarters
    began = time.monotonic()
    killed_when(generate_command(killed, 300), lambda: time.monotonic() - began > 0.75 * duration)
    assert not killed.exists() or not any(path.name.startswith("image-") for path in killed.iterdir())
    subprocess.run(generate_command(killed, 300), env=cli_env(), check=True, capture_output=True)
    for name in ("image-000.png", "image-001.png"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes()


SWEEP = """
setting: digits
rewards: [bold, stencil]
weights: [[0, 1], [0.5, 0.5], [1, 0]]
methods: [base, db-mpa, soup]
images_per_prompt: 1
prompts: ["3", "7"]
steps: 6
batch_images: 2
"""


def rewards_of(out: Path) -> dict:
    """What a sweep measured, without its timings and memory."""
    kept = ("weights", "kl_scale", "rewards", "weighted", "denoiser_calls", "denoiser_rows")
    results = json.loads((out / "results.json").read_text())
    return {
        method: [{key: entry[key] for key in kept} for entry in series] for method, series in results["methods"].items()
    }


def test_a_killed_sweep_resumes_to_the_uninterrupted_results(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*CLI, "sweep", str(config), "--out", str(whole)], env=cli_env(), check=True, capture_output=True)
    killed_when(
        [*CLI, "sweep", str(config), "--out", str(killed)],
        lambda: len(list((killed / "cells").glob("*.json"))) >= 2 if (killed / "cells").is_dir() else False,
    )
    assert not (killed / "results.json").exists()
    done = {path.name for path in (killed / "cells").glob("*.json")}
    subprocess.run([*CLI, "sweep", str(config), "--out", str(killed)], env=cli_env(), check=True, capture_output=True)
    assert done <= {path.name for path in (killed / "cells").glob("*.json")}
    assert rewards_of(killed) == rewards_of(whole)
