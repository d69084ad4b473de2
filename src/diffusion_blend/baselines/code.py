"""CoDe (Singh et al., 2025): blockwise best-of-N sampling of the base model for a weighted reward.

Every ``block`` steps, each image's sampler branches into ``candidates`` continuations that each run the whole
block with their own noise; each candidate is scored by the weighted reward Σ_i w_i r_i(x̂₀) of its Tweedie
estimate at the block's end (its final sample after the last block) and the best continues. The comparison in the
Diffusion Blend paper used N = 20, B = 5. ``branching="step"`` is the variant of the published script: branch one
step at the start of each block, keep the best, run the block's other steps unbranched.

One candidate (N = 1) is the base sampler itself, draw for draw: a block's noise for image b is drawn from image b's
generator, ``candidates`` draws per step, and the prediction that scored the chosen candidate is reused as its next
step's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampler import BaseSampler, check_weights

BRANCHING = ("block", "step")
#: the published comparison's settings
CANDIDATES, BLOCK = 20, 5


@torch.no_grad()
def code_sample(
    sampler: BaseSampler,
    generators: Sequence[torch.Generator],
    weights: torch.Tensor,
    *,
    candidates: int = CANDIDATES,
    block: int = BLOCK,
    branching: str = "block",
) -> torch.Tensor:
    """Samples of CoDe for each image's ``weights`` row ([images, rewards]); one generator per image."""
    check_code_options(candidates, block, branching)
    weights = check_weights(weights, len(generators), len(sampler.differentiable))
    x = sampler.initial(generators)
    images = len(generators)
    rows = torch.arange(images, device=x.device)
    steps = len(sampler.path.steps)
    pending = None  # the prediction at x for the next step, where scoring computed it already
    for start in range(0, steps, block):
        end = min(start + block, steps)
        branch_end = end if branching == "block" else start + 1
        branched = rows.repeat_interleave(candidates)
        xs = x.repeat_interleave(candidates, dim=0)
        for index in range(start, branch_end):
            out = (
                pending.repeat_interleave(candidates, dim=0)
                if index == start and pending is not None
                else sampler.predict(xs, sampler.path.steps[index].timestep, branched)
            )
            xs = sampler.step(index, xs, out, sampler.noise(generators, candidates))
        scores, pending = score_candidates(sampler, xs, branch_end, branched, weights)
        best = scores.view(images, candidates).argmax(1) + rows * candidates
        x, pending = xs[best], None if pending is None else pending[best]
        for index in range(branch_end, end):  # "step" branching: the rest of the block, unbranched
            out = pending if pending is not None else sampler.predict(x, sampler.path.steps[index].timestep, rows)
            x, pending = sampler.step(index, x, out, sampler.noise(generators, 1)), None
    return x


def score_candidates(
    sampler: BaseSampler, xs: torch.Tensor, end: int, rows: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weighted reward of each candidate's x̂₀ at step ``end`` (the sample itself after the last step), and the
    prediction that estimate came from."""
    if end == len(sampler.path.steps):
        return sampler.weighted(xs, rows, weights), None
    out, clean = sampler.clean(end, xs, rows)
    return sampler.weighted(clean, rows, weights), out


def check_code_options(candidates: int, block: int, branching: str) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"CoDe candidates must be a positive integer, got {candidates!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"CoDe block must be a positive number of steps, got {block!r}")
    if branching not in BRANCHING:
        raise ValueError(f"CoDe branching must be one of {', '.join(BRANCHING)}, got {branching!r}")
