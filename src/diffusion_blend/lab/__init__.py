"""The lab: an exact ground truth for blending.

A Gaussian-mixture base and quadratic rewards make every tilted target, and every exact denoiser, closed form; the
lab samples the oracle, the blends and the base through the product's own ``BlendedDenoiser`` and diffusers
schedulers, and measures the blend's approximation error (its Jensen gap) directly.
"""

from .exact import ExactDenoiser
from .experiment import initial_noise, make_scheduler, run_lab, sample
from .mixture import GaussianMixture, QuadraticReward
from .scenario import Scenario, default_scenario, grid_scenario, load_scenario

__all__ = [
    "ExactDenoiser",
    "GaussianMixture",
    "QuadraticReward",
    "Scenario",
    "default_scenario",
    "grid_scenario",
    "initial_noise",
    "load_scenario",
    "make_scheduler",
    "run_lab",
    "sample",
]
