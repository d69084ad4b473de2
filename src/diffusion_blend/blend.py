"""The Diffusion Blend equation (arXiv 2505.18547, Sec. 4) and the validation of its weights.

At every denoising step the base and basis denoisers are evaluated on the same input and combined:

    out = base + λ · Σ_i w_i · (member_i − base)

DB-MPA is λ = 1 with Σw = 1 (then out = Σ w_i member_i and the base is not needed), DB-KLA is one member with
any λ, and the joint form takes any w and λ. The combination is linear, so it holds for ε-, v-, x0- and
flow-velocity predictions alike, as long as every member shares the parameterisation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

#: |1 − λ·Σw| below this counts as zero: the base then drops out of the formula and need not be evaluated.
BASE_COEFFICIENT_TOLERANCE = 1e-9
#: |Σw − 1| allowed for weights that must lie on the probability simplex.
SIMPLEX_TOLERANCE = 1e-6
#: Denoiser predictions stay well within this magnitude: coefficients that would carry one past the largest number
#: of the prediction's dtype are refused before sampling (they would give NaN or inf images).
PREDICTION_RANGE = 1e3
#: No coefficient of a meaningful blend comes near this (the method's λ stays within a few units): beyond it the
#: samples leave the range a denoiser's normalisations can square, and come out NaN, whatever the dtype.
MAX_COEFFICIENT = 1e6


def validate_kl_scale(kl_scale: float) -> float:
    """Return λ as a float; raise if it is not a finite number ≥ 0."""
    value = _as_number(kl_scale, "kl_scale")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"kl_scale must be a finite number >= 0, got {kl_scale!r}")
    return value


def validate_weights(weights: Mapping[str, float], names: Iterable[str], *, simplex: bool = False) -> dict[str, float]:
    """Return a weight for every basis name (names left out count as 0); raise on unknown names or bad values.

    With ``simplex=True`` (the stochastic DB-MPA-LS mode) the weights must be probabilities: each ≥ 0, summing to 1.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of basis name to weight, got {type(weights).__name__}")
    names = list(names)
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise ValueError(f"unknown weight name(s) {', '.join(map(repr, unknown))}; the basis is {', '.join(names)}")
    checked = {name: 0.0 for name in names}
    for name, weight in weights.items():
        value = _as_number(weight, f"weight {name!r}")
        if not math.isfinite(value):
            raise ValueError(f"weight {name!r} is {weight!r}: weights must be finite numbers")
        checked[name] = value
    if simplex:
        negative = [name for name, value in checked.items() if value < 0]
        if negative:
            raise ValueError(f"stochastic mode needs non-negative weights; {', '.join(map(repr, negative))} < 0")
        total = math.fsum(checked.values())
        if abs(total - 1.0) > SIMPLEX_TOLERANCE:
            raise ValueError(f"stochastic mode needs weights that sum to 1 (a probability per member), got {total:g}")
    return checked


def check_coefficients(weights: Mapping[str, float], kl_scale: float, dtype: torch.dtype) -> None:
    """Raise where a coefficient of the expanded formula, λ·w_i or 1 − λΣw, exceeds :data:`MAX_COEFFICIENT` or is so
    large that predictions of up to :data:`PREDICTION_RANGE` times it overflow ``dtype`` (float16: ±65)."""
    floating = dtype if dtype.is_floating_point else torch.float32
    largest = min(MAX_COEFFICIENT, torch.finfo(floating).max / PREDICTION_RANGE)
    coefficients = {f"kl_scale·w[{name!r}]": kl_scale * weight for name, weight in weights.items()}
    coefficients["1 − kl_scale·Σw"] = 1.0 - kl_scale * math.fsum(weights.values())
    too_large = [f"{what} = {value:.3g}" for what, value in coefficients.items() if not abs(value) <= largest]
    if too_large:
        raise ValueError(
            f"weights and kl_scale give {', '.join(too_large)}: beyond ±{largest:.3g} the blend's {dtype} samples "
            "overflow (NaN or inf images); use smaller weights or kl_scale"
        )


def weighed_names(samples: Sequence[tuple[Mapping[str, float], float]]) -> list[str]:
    """The basis names whose coefficient λ·w_i is non-zero for some sample (weights, λ), in the order they come:
    the members a blend has to evaluate."""
    names = dict.fromkeys(name for weights, _ in samples for name in weights)
    return [name for name in names if any(kl_scale * weights.get(name, 0.0) != 0 for weights, kl_scale in samples)]


def base_coefficient(weights: Iterable[float], kl_scale: float) -> float:
    """The base's coefficient 1 − λ·Σw once the formula is expanded; the base is needed only where it is non-zero."""
    coefficient = 1.0 - kl_scale * math.fsum(weights)
    return 0.0 if abs(coefficient) <= BASE_COEFFICIENT_TOLERANCE else coefficient


def blend_predictions(
    base: torch.Tensor | None,
    members: Sequence[torch.Tensor],
    weights: Sequence[float],
    kl_scale: float = 1.0,
) -> torch.Tensor:
    """Blend denoiser outputs: ``base + kl_scale · Σ_i w_i (members[i] − base)``.

    ``base`` may be ``None`` only when ``kl_scale · Σw = 1`` (DB-MPA: λ = 1, Σw = 1); the result is then
    ``Σ_i kl_scale · w_i · members[i]``. Members whose weight is zero do not contribute. The arithmetic stays in
    the inputs' dtype.
    """
    members, weights = list(members), [_as_number(w, "weight") for w in weights]
    if len(members) != len(weights):
        raise ValueError(f"got {len(members)} member predictions but {len(weights)} weights")
    if any(not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    kl_scale = validate_kl_scale(kl_scale)
    terms = [(member, weight) for member, weight in zip(members, weights) if kl_scale * weight != 0]
    _check_shapes(base, [member for member, _ in terms])
    if base is None:
        if base_coefficient(weights, kl_scale) != 0:
            raise ValueError(
                "base may be None only when kl_scale * sum(weights) == 1 "
                f"(got kl_scale={kl_scale:g}, sum(weights)={math.fsum(weights):g})"
            )
        return _weighted_sum([(member, kl_scale * weight) for member, weight in terms])
    if not terms:
        return base
    return base + kl_scale * _weighted_sum([(member - base, weight) for member, weight in terms])


def blend_per_row(
    base: torch.Tensor | None,
    members: Sequence[torch.Tensor],
    weights: torch.Tensor,
    kl_scale: float = 1.0,
) -> torch.Tensor:
    """The equation with weights of their own for every row of the batch (a sweep over weights in one batch):
    row r is ``base[r] + kl_scale · Σ_i weights[r, i] (members[i][r] − base[r])``.

    ``weights`` is a (rows, members) tensor on the predictions' device. ``base`` may be ``None`` where
    ``kl_scale · Σ_i weights[r, i] = 1`` on every row, which the caller knows (checking it here would read the
    weights back from the device).
    """
    members = list(members)
    if weights.ndim != 2 or weights.shape[1] != len(members):
        raise ValueError(f"weights of shape {tuple(weights.shape)} for {len(members)} member predictions")
    if not members:  # (λ = 0, or no weight on any member for any row)
        return base
    _check_shapes(base, members)
    if weights.shape[0] != len(members[0]):
        raise ValueError(f"weights for {weights.shape[0]} rows, predictions of {len(members[0])}")
    dtype = members[0].dtype
    # the weights at least in float32 (as Python-float weights are applied), the result in the predictions' dtype
    weight_dtype = torch.promote_types(dtype, torch.float32)

    def per_row(scaled: torch.Tensor) -> list[torch.Tensor]:  # each member's column, broadcast over its rows
        return list(scaled.to(weight_dtype).T.reshape(len(members), -1, *[1] * (members[0].ndim - 1)))

    if base is None:
        return _weighted_sum(list(zip(members, per_row(kl_scale * weights)))).to(dtype)
    update = _weighted_sum([(member - base, weight) for member, weight in zip(members, per_row(weights))])
    return (base + kl_scale * update).to(dtype)


def _weighted_sum(terms: list[tuple[torch.Tensor, float | torch.Tensor]]) -> torch.Tensor:
    """Σ weight · tensor, a new tensor, with no multiplication by a weight of 1 beside other terms (x · 1 = x
    exactly; on a GPU every operation saved is a kernel launch saved)."""
    if len(terms) == 1:
        return terms[0][0] * terms[0][1]
    scaled = [tensor if isinstance(weight, float) and weight == 1 else tensor * weight for tensor, weight in terms]
    total = scaled[0]
    for tensor in scaled[1:]:
        total = total + tensor
    return total


def _check_shapes(base: torch.Tensor | None, members: list[torch.Tensor]) -> None:
    reference = base if base is not None else (members[0] if members else None)
    for member in members:
        if member.shape != reference.shape:
            raise ValueError(f"member prediction of shape {tuple(member.shape)} != {tuple(reference.shape)}")


def _as_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _is_scalar_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1
