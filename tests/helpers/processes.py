"""Running the CLI in subprocesses, in one process or in two (accelerate), as users run it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).parents[1]


def cli_env() -> dict:
    """The environment of a CLI subprocess: tests/ importable (helpers.finetune_rewards), no hub, one thread."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def two_processes(port: int) -> list[str]:
    """The command prefix that runs the ``-m`` module given after it in two processes on this machine (CPU)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


def generate_args(base, basis: dict, out, *extra: str) -> list[str]:
    """``generate``'s arguments for a short run of a tiny pipeline folder (3 steps, 16 px) with the given basis."""
    args = ["generate", "--base", str(base), "--prompt", "a red cat", "--steps", "3", "--height", "16"]
    args += ["--width", "16", "--device", "cpu", "--out", str(out)]
    for name, path in basis.items():
        args += ["--basis", f"{name}={path}"]
    return args + list(extra)
