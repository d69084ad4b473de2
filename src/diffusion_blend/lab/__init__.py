"""The lab: an exact ground truth for blending.

A Gaussian-mixture base and quadratic rewards make every tilted target, and every exact denoiser, closed form; the
lab samples the oracle, the blends and the base through the product's own ``BlendedDenoiser`` and diffusers
schedulers, and measures the blend's approximation error (its Jensen gap) directly.
"""

from .exact import ExactDenoiser
from .experiment import blend_method_name, initial_noise, make_scheduler, run_lab, sample, sliced_wasserstein
from .mixture import GaussianMixture, QuadraticReward, weighted_reward
from .scenario import Scenario, Schedule, default_scenario, grid_scenario, load_scenario

__all__ = [
    "ExactDenoiser",
    "GaussianMixture",
    "QuadraticReward",
    "Scenario",
    "Schedule",
    "blend_method_name",
    "default_scenario",
    "grid_scenario",
    "initial_noise",
    "load_scenario",
    "make_scheduler",
    "run_lab",
    "sample",
    "sliced_wasserstein",
    "weighted_reward",
]
