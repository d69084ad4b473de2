"""``diffusion-blend sweep``: every method at every preference weight (``diffusion_blend.evaluate``), resumable
and shared between the processes of ``accelerate launch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .running import CommandError, quiet_libraries, run_reporting_errors


def sweep(
    config: Annotated[Path | None, typer.Argument(help="The sweep's YAML configuration.")] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for results.json, samples.csv, pareto.png, grid.png, report.md (and the resumable cells/)."
        ),
    ] = Path("sweep"),
    preset: Annotated[str | None, typer.Option(help="A built-in configuration instead: digits or lab.")] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
) -> None:
    """Every method at every preference weight, scored by every reward: a Pareto plot, an image grid, a report.

    A rerun into the same --out finishes what is missing; under ``accelerate launch -m diffusion_blend sweep`` the
    processes share the work."""
    run_reporting_errors(_sweep, config=config, out=out, preset=preset, device=device)


def _sweep(config: Path | None, out: Path, preset: str | None, device: str | None) -> None:
    from ..evaluate import run_sweep

    quiet_libraries()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    for path in run_sweep(config, out, preset=preset, device=device or default_device()):
        typer.echo(str(path))


def default_device() -> str:
    """cuda when available, else cpu; under accelerate, this process's device."""
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return str(PartialState().device)
    return "cpu"
