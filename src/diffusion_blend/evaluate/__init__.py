"""Sweeps: every method at every preference weight, scored by every reward, drawn as a Pareto front and a grid.

``config.py`` reads and checks a sweep's YAML; ``settings.py`` is where it samples (a pipeline with basis models,
oracles and reward models, and each method on it); ``sweep.py`` plans the work in resumable units and splits them
across processes; ``report.py`` turns the unit files into ``results.json``, ``samples.csv``, ``pareto.png``,
``grid.png`` and ``report.md``.

    run_sweep("sweep.yaml", "out")          # or run_sweep(None, "out", preset="digits")
"""

from .config import ConfigError, load_config
from .sweep import run_sweep

__all__ = ["ConfigError", "load_config", "run_sweep"]
