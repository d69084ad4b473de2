"""``python -m diffusion_blend``: the command line (what ``accelerate launch -m diffusion_blend ...`` runs)."""

from .cli import app

app()
