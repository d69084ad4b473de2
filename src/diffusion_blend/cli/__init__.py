"""The ``diffusion-blend`` command line (typer): one module a command or group of commands, all registered here.

Every command validates its inputs before it loads a model, reports a bad input as one line on stderr with a
non-zero exit code (``running.py``), and writes its outputs only once everything succeeded (temp file, then rename).
"""

from __future__ import annotations

import typer

from . import demo, finetune, generate, lab, rewards, sweep, ui

app = typer.Typer(
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
