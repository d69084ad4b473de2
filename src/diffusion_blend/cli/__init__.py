"""The ``diffusion-blend`` command line (typer): one module a command or group of commands, all registered here.

Every command validates its inputs before it loads a model, reports a bad input as one line on stderr with a
non-zero exit code (``running.py``), and writes its outputs only once everything succeeded (temp file, then rename).
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from . import demo, finetune, generate, lab, rewards, sweep, ui

try:  # typer ≥ 0.25 runs on its own copy of click
    from typer._click import exceptions as usage
except ImportError:
    from click import exceptions as usage
#: the help a group prints when called bare (click ≥ 8.2 raises it as a usage error)
NO_ARGS_IS_HELP = getattr(usage, "NoArgsIsHelpError", ())


class OneLineUsage(typer.Typer):
    """The app as the ``diffusion-blend`` script runs it: a mistyped option or argument is one line on stderr
    (``error: No such option: --stpes (see diffusion-blend generate --help)``), not a usage box."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        try:
            code = command.main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS_IS_HELP as shown:
            shown.show()
            sys.exit(shown.exit_code)
        except usage.UsageError as error:
            path = error.ctx.command_path if error.ctx is not None else "diffusion-blend"
            typer.echo(f"error: {error.format_message()} (see {path} --help)", err=True)
            sys.exit(error.exit_code)
        except usage.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = OneLineUsage(
    name="diffusion-blend",
    help="Align a diffusion model with any mix of preferences at inference time (Diffusion Blend).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Diffusion Blend: blend basis models fine-tuned for single rewards, at every denoising step."""


for command in (generate.generate, demo.demo, ui.ui, sweep.sweep, finetune.finetune, rewards.score):
    app.command()(command)
app.add_typer(lab.lab_app, name="lab")
app.add_typer(rewards.rewards_app, name="rewards")

__all__ = ["app"]
