"""``diffusion-blend rewards list`` and ``diffusion-blend score``: the registered reward models, and images scored
with one of them (or a weighted sum)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .parsing import parse_weights_paths
from .running import CommandError, quiet_libraries, run_reporting_errors

rewards_app = typer.Typer(help="The reward models that define preferences.", no_args_is_help=True)


@rewards_app.command("list")
def rewards_list() -> None:
    """List the registered rewards: what each measures, where its weights come from, whether it is differentiable."""
    from rich.console import Console
    from rich.table import Table

    from ..rewards import ALIASES, list_rewards

    table = Table(title="rewards (also: lab:<name>, module:function, weighted sums like ir=0.5,aes=0.5)")
    for column in ("name", "aliases", "measures", "weights", "differentiable", "licence"):
        table.add_column(column)
    for name, info in list_rewards().items():
        aliases = ", ".join(alias for alias, target in ALIASES.items() if target == name)
        table.add_row(name, aliases, info.measures, info.weights, "yes" if info.differentiable else "no", info.licence)
    Console(width=160).print(table)


def score(
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    reward: Annotated[str, typer.Option(help="A reward name, a weighted sum (ir=0.5,aes=0.5) or module:function.")],
    prompt: Annotated[str, typer.Option(help="The prompt the images were made for.")],
    weights_path: Annotated[
        list[str] | None,
        typer.Option(
            help="A reward's weights (folder, file or hub id): PATH for a single reward, NAME=PATH in a sum; repeat."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored per batch.")] = 16,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list of {image, score}.")] = False,
) -> None:
    """Score images with a reward model."""
    run_reporting_errors(_score, **locals())


def _score(images, reward, prompt, weights_path, batch_size, device, json_output) -> None:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..rewards import parse_reward, parse_weighted

    quiet_libraries()
    pixels = []
    for path in images:
        try:
            with Image.open(path) as image:
                pixels.append(np.asarray(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            raise CommandError(f"{path}: not a readable image ({error})") from error
    if len({p.shape for p in pixels}) > 1:
        raise CommandError("images must share one size to be scored as a batch")
    if batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = parse_weights_paths(weights_path, list(parse_weighted(reward)))
    model = parse_reward(reward, paths=paths, device=device)
    scores = []
    for start in range(0, len(pixels), batch_size):
        chunk = torch.from_numpy(np.stack(pixels[start : start + batch_size])).permute(0, 3, 1, 2)
        scores += model(chunk.float().div(255).to(device), [prompt] * len(chunk)).tolist()
    if json_output:
        typer.echo(json.dumps([{"image": str(path), "score": value} for path, value in zip(images, scores)]))
        return
    width = max(len(str(path)) for path in images)
    for path, value in zip(images, scores):
        typer.echo(f"{str(path):<{width}}  {value:.6g}")
