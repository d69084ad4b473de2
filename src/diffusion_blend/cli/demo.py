"""``diffusion-blend demo``: the embedded digits model's basis models blended across weights, in two pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .running import CommandError, quiet_libraries, run_reporting_errors


def demo(
    out: Annotated[Path, typer.Option(help="Folder for sweep.png and rewards.png.")] = Path("diffusion-blend-demo"),
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same pictures).")] = 0,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
) -> None:
    """Blend the embedded digits model's basis models across weights: a picture of the sweep and one of the rewards."""
    run_reporting_errors(_demo, out=out, seed=seed, device=device)


def _demo(out: Path, seed: int, device: str | None) -> None:
    import torch

    from ..presets.digits.demo import run_demo

    quiet_libraries()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    for path in run_demo(out, seed=seed, device=device or ("cuda" if torch.cuda.is_available() else "cpu")):
        typer.echo(str(path))
