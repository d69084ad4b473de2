"""The methods Diffusion Blend is compared with, each usable on its own.

- :class:`RewardedSoup` (``soup.py``): the basis models' parameters interpolated (exact for LoRAs, or the published
  variant that averages A and B separately);
- :func:`code_sample` (``code.py``): CoDe, blockwise best-of-N sampling of the base for the weighted reward;
- :func:`guided_sample` (``guidance.py``): the base's stochastic step moved up the weighted reward's gradient;
- both steer :class:`BaseSampler` (``sampler.py``), the base model's sampler as a loop.

The fourth baseline, the MORL oracle, is a model fine-tuned on the mixed reward: ``diffusion_blend.finetune``.
"""

from .code import code_sample
from .guidance import guided_sample
from .sampler import BaseSampler
from .soup import RewardedSoup

__all__ = ["BaseSampler", "RewardedSoup", "code_sample", "guided_sample"]
