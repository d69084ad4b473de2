"""Sequential Monte Carlo with the blend as proposal: :mod:`.particles` is the algorithm (weights, resampling, the
trace), :mod:`.pipeline` runs it inside a diffusers pipeline call (``Blend.blend(..., corrector=SMC(...))``)."""

from .particles import (
    SMC,
    Particles,
    Trace,
    effective_fraction,
    smc_sample,
    systematic_resample,
    transition_log_ratio,
)

__all__ = [
    "SMC",
    "Particles",
    "Trace",
    "effective_fraction",
    "smc_sample",
    "systematic_resample",
    "transition_log_ratio",
]
