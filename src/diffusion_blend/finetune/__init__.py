"""KL-regularised reward fine-tuning: basis models (one reward each) and MORL oracles (a mix of rewards).

Every method estimates one objective over a stochastic sampling path (:mod:`.path`): maximise
E[r(x₀)] − α Σ_t KL_t, whose optimal sampler draws from p_base·exp(r/α) where the path is memoryless.

- ``weighted-dsm`` (default): denoising score matching on samples weighted by exp(r/α), tempered where needed;
- ``adjoint-matching``: Adjoint Matching's lean-adjoint regression (differentiable rewards);
- ``policy-gradient``: likelihood-ratio gradient with the exact per-step KL (any reward).

:func:`finetune` trains a LoRA on a Stable Diffusion pipeline; :func:`~.lab.lab_finetune` a network on the lab,
against the exact target.
"""

from .run import finetune, read_prompts

__all__ = ["finetune", "read_prompts"]
