"""``diffusion-blend ui``: the slider page (``diffusion_blend.ui``) served for the embedded model or a given
pipeline and basis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .parsing import parse_basis
from .running import CommandError, quiet_libraries, run_reporting_errors


def ui(
    base: Annotated[
        str | None,
        typer.Option(
            help="Base pipeline (folder or hub id); default: the embedded digits "
            "model with its basis models and rewards."
        ),
    ] = None,
    basis: Annotated[list[str] | None, typer.Option(help="NAME=PATH of a basis model (with --base); repeat.")] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(help="A reward model to score each image with: a registry name or module:function; repeat it."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="The prompt the page opens with.")] = "3",
    front: Annotated[
        Path | None,
        typer.Option(
            help="A sweep's results.json of this setting: its fronts are drawn behind the images in reward space."
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 serves "
            "anyone who can reach it (no authentication)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
) -> None:
    """Serve a local web page with one slider per basis model: move the sliders, press Generate."""
    run_reporting_errors(
        _ui, base=base, basis=basis or [], reward=reward or [], prompt=prompt, front=front, host=host, port=port
    )


def _ui(
    base: str | None, basis: list[str], reward: list[str], prompt: str, front: Path | None, host: str, port: int
) -> None:
    from ..ui import Page, digits_page, read_front, require_gradio, serve

    require_gradio()
    quiet_libraries()
    sweep_front = read_front(front) if front is not None else None
    if base is None:
        if basis or reward:
            raise CommandError("--basis and --reward go with --base (the embedded model brings its own)")
        page = digits_page(sweep_front)
    else:
        from diffusers import DiffusionPipeline

        from ..pipeline import Blend
        from ..rewards import parse_reward

        if not basis:
            raise CommandError("--base needs at least one --basis NAME=PATH")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
            raise CommandError(f"--base: {base} is not a folder")
        blend = Blend(DiffusionPipeline.from_pretrained(base), basis=parse_basis(basis))
        page = Page(blend, {spec: parse_reward(spec) for spec in reward}, prompt=prompt, front=sweep_front)
    typer.echo(f"serving on http://{host}:{port}/ (Ctrl+C stops)", err=True)
    serve(page, host=host, port=port)
