"""How every command runs: a bad input or a failed step becomes one line on stderr and exit code 2, with the
libraries' own logs and progress bars silenced (the commands report progress and errors themselves)."""

from __future__ import annotations

import os
from typing import Any

import typer


class CommandError(Exception):
    """A bad input or a failed step, reported as one line without a traceback."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def run_reporting_errors(command: Any, **kwargs: Any) -> None:
    """Run a command; any failure becomes one line on stderr and exit code 2.

    ``DIFFUSION_BLEND_DEBUG=1`` shows the traceback instead."""
    try:
        command(**kwargs)
    except typer.Exit:
        raise
    except Exception as error:
        if os.environ.get("DIFFUSION_BLEND_DEBUG"):
            raise
        text = str(error).strip().splitlines()
        fail(
            text[0]
            if text and isinstance(error, (CommandError, ValueError))
            else f"{type(error).__name__}: {' '.join(text)}"
        )


def quiet_libraries() -> None:
    """Silence the libraries' own logs, warnings and progress bars: the CLI reports progress and errors itself."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
