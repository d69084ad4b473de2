"""diffusion-blend: align a diffusion model with any mix of preferences at inference time.

Diffusion Blend (arXiv 2505.18547) blends, at every denoising step, the predictions of a base model and of basis
models fine-tuned (KL-regularised RL) for one reward each: ``out = base + λ Σ w_i (member_i − base)``.
"""

from .blend import base_coefficient, blend_per_row, blend_predictions, validate_kl_scale, validate_weights
from .denoiser import BlendedDenoiser
from .pipeline import Blend

__all__ = [
    "Blend",
    "BlendedDenoiser",
    "base_coefficient",
    "blend_per_row",
    "blend_predictions",
    "validate_kl_scale",
    "validate_weights",
]
__version__ = "0.1.0"
