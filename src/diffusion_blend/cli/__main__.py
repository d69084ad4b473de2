"""``python -m diffusion_blend.cli``: the command line."""

from . import app

app()
