"""DB-MPA-LS's draws: one basis member per sample and denoising step, drawn with probability w.

A sample is recognised by its latent input: rows with bitwise identical latents are one sample presented several
times and share their draw — within a call (classifier-free guidance's halves batched together) and with the
previous call when it was at the same timestep (pipelines that run the two halves as two calls). Everything runs
on the latents' device without reading anything back to the host: rows are compared by a 64-bit hash of their
bits, in one sort of the previous call's rows and this call's.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from .predictions import Rows, tensors_of

#: XORed into the previous call's row hashes at a new step: they then match no row of this call (a salted hash
#: equals another row's hash as rarely as two distinct rows' hashes do)
NEW_STEP_SALT = 0x2545F4914F6CDD1D


class PreviousDraws(NamedTuple):
    """The previous call's rows (as hashes), their draws, and its timestep (None: unknown)."""

    hashes: torch.Tensor
    draws: torch.Tensor
    timestep: Any


class DrawCache:
    """Draws one member index per row; a row takes the draw of the first identical row of its call or, when the
    previous call was at the same timestep, of its identical row there. (The lab draws for tens of thousands of
    rows at once; a sampling step has a few rows, and every operation here is a kernel launch on a GPU.)"""

    def __init__(self):
        self.previous: PreviousDraws | None = None

    def draw(
        self, latent: Rows, timestep: Any, probabilities: torch.Tensor, generator, samples: int = 1
    ) -> torch.Tensor:
        """One member index per row; ``probabilities`` is w, or one row of it per sample where ``samples`` blends
        differ (weights or λ per sample: their samples are told apart even where a sweep gives them one noise)."""
        hashes = sample_hashes(latent)
        if samples > 1:
            hashes = hashes ^ per_row(_sample_salts(samples, hashes.device), len(hashes))
        timestep = _comparable_timestep(timestep, hashes.device)
        known = self.previous if timestep is not None else None
        same_step = (
            known is not None and known.timestep is not None and known.timestep == timestep
        )  # (on a GPU: a tensor)
        known = known if same_step is not False else None
        if probabilities.ndim == 1:
            fresh = torch.multinomial(probabilities, len(hashes), replacement=True, generator=generator)
        else:  # one row per sample: row r is sample r mod S's
            fresh = _drawn_per_row(per_row(probabilities, len(hashes)), generator)
        keys, candidates = hashes, fresh.to(hashes.device, non_blocking=True)
        if known is not None:  # the previous rows first: an identical one then comes before this call's rows
            previous = known.hashes
            if same_step is not True:  # decided on the device: at another step no previous row may match
                previous = torch.where(same_step, previous, previous ^ NEW_STEP_SALT)
            keys, candidates = torch.cat([previous, hashes]), torch.cat([known.draws, candidates])
        order = torch.argsort(keys, stable=True)
        first = order[torch.searchsorted(keys[order], hashes)]  # the first row of each row's key (stable sort)
        draws = candidates[first]
        self.previous = PreviousDraws(hashes, draws, timestep)
        return draws


def rows_by_member(drawn: torch.Tensor, names: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """(member name, its rows) for every member drawn at least once, in member order."""
    drawn = drawn.to(device)
    return [(names[member], (drawn == member).nonzero().squeeze(1)) for member in torch.unique(drawn).tolist()]


def per_row(per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """A (samples, …) table repeated for ``rows`` rows: the rows are the samples, repeated."""
    if rows % len(per_sample):
        raise ValueError(
            f"weights are given for {len(per_sample)} samples, but the denoiser is called with {rows} "
            "rows (not that many samples, repeated): give one weight mapping per image"
        )
    return per_sample.repeat(rows // len(per_sample), *[1] * (per_sample.ndim - 1))


def _drawn_per_row(probabilities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of a (rows × members) probability table, by inverse transform sampling: a uniform number
    against the row's cumulative probabilities (``torch.multinomial`` with one draw per row checks its input with
    host reads, which make a GPU wait)."""
    uniform = torch.rand(
        len(probabilities), 1, generator=generator, device=probabilities.device, dtype=probabilities.dtype
    )
    return (uniform >= probabilities.cumsum(1)).sum(1).clamp_max(probabilities.shape[1] - 1)


def sample_hashes(latent: Rows) -> torch.Tensor:
    """One hash per sample: a row of the latent tensor, or an item of a per-sample list (Z-Image; in its omni mode a
    list of the sample's tensors, hashed together)."""
    if isinstance(latent, list):
        return torch.cat(
            [
                _row_hashes(torch.cat([t.detach().reshape(-1) for t in tensors_of(sample)]).reshape(1, -1))
                for sample in latent
            ]
        )
    return _row_hashes(latent.detach().reshape(len(latent), -1))


def _row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of each row's bits: every element's bits are scrambled (xor-shift-multiply, so structured
    differences such as a flipped sign bit do not cancel), then summed with fixed random odd weights in wrapping
    int64 arithmetic. Distinct rows collide with a probability of the order of 2⁻⁶⁰."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[rows.element_size()]
    bits = rows.contiguous().view(integer).to(torch.int64)
    bits = (bits ^ (bits >> 29)) * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    bits = bits ^ (bits >> 32)
    return (bits * _hash_multipliers(rows.shape[1], rows.device)).sum(1)


@functools.lru_cache(maxsize=16)
def _sample_salts(samples: int, device: torch.device) -> torch.Tensor:
    """A fixed random 64-bit salt per sample index, XORed into its rows' hashes."""
    generator = torch.Generator().manual_seed(0x2545F491)
    return torch.randint(-(2**62), 2**62, (samples,), generator=generator, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=16)
def _hash_multipliers(length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0x5DEECE66D)
    multipliers = torch.randint(-(2**62), 2**62, (length,), generator=generator, dtype=torch.int64) * 2 + 1
    return multipliers.to(device)


def _comparable_timestep(timestep: Any, device: torch.device) -> Any:
    """The timestep as a Python number or a 0-d tensor on ``device`` (compared there, without a host read)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return timestep.detach().reshape(-1)[0].to(device, non_blocking=True).clone()
    return float(timestep) if isinstance(timestep, (int, float)) else None
