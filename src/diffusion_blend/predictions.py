"""What a denoiser predicts, and the row operations the blend does on it.

A prediction is one tensor with the batch's rows first or, for denoisers of per-sample sizes (Z-Image), a list
with one tensor per sample; a denoiser with several outputs (LTX-2's video and audio) predicts :class:`Fields`, one
such prediction per output field. Every operation here works on one field and is lifted to :class:`Fields` by
:func:`per_field`, so the blend is the same equation field by field and sample by sample.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .blend import blend_per_row, blend_predictions

#: A denoiser's sample or prediction: one tensor with the batch's rows first or, for denoisers of per-sample sizes
#: (Z-Image), a list with one tensor per sample; the blend is the same equation, sample by sample.
Rows = torch.Tensor | list[torch.Tensor]


class Fields(tuple):
    """The predictions of a denoiser with several outputs (LTX-2's video and audio), in the order of its output's
    fields: each field is blended, stacked and split as a prediction of its own."""


#: What a denoiser call predicts: its prediction, or one per prediction field of a several-output denoiser
Prediction = Rows | Fields


def per_field(function: Callable[..., Rows], *predictions: Prediction) -> Prediction:
    """``function`` applied to the predictions' rows: field by field for :class:`Fields` (the i-th field of every
    prediction together), else once."""
    if isinstance(predictions[0], Fields):
        return Fields(function(*fields) for fields in zip(*predictions))
    return function(*predictions)


# ------------------------------------------------------------------------------------------------- denoiser outputs
def prediction_of(output: Any) -> Prediction:
    """The prediction in a denoiser's output: the output itself (a tensor), else its fields that hold rows (tensors,
    or lists of per-sample tensors: Z-Image) — one, or :class:`Fields` where there are several (LTX-2's video and
    audio). Other fields (``None``, a cache object) are not predictions."""
    if isinstance(output, torch.Tensor):
        return output
    predicted = [value for value in _output_fields(output).values() if _holds_rows(value)]
    if not predicted:
        raise TypeError(f"cannot find the prediction in a denoiser output of type {type(output).__name__}")
    return predicted[0] if len(predicted) == 1 else Fields(predicted)


def with_prediction(template: Any, prediction: Prediction) -> Any:
    """``template`` (a denoiser output) with its prediction fields replaced, keeping its type and any other fields."""
    if isinstance(template, torch.Tensor):
        return prediction
    fields = _output_fields(template)
    replaced = iter(prediction if isinstance(prediction, Fields) else [prediction])
    fields = {key: next(replaced) if _holds_rows(value) else value for key, value in fields.items()}
    if isinstance(template, (tuple, list)):
        return type(template)(fields.values())
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **fields)
    return type(template)(fields)


def _output_fields(output: Any) -> dict:
    """A denoiser output's fields in order: a tuple's or list's items by position, a ``BaseOutput``'s (an ordered
    dict) or another mapping's by key."""
    if isinstance(output, (tuple, list)):
        return dict(enumerate(output))
    if isinstance(output, Mapping):
        return dict(output)
    raise TypeError(f"cannot read a denoiser output of type {type(output).__name__}")


def _holds_rows(value: Any) -> bool:
    """Whether an output field is a prediction: a tensor of rows, or a list of per-sample tensors (or lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.ndim > 0
    return isinstance(value, list) and bool(value) and all(isinstance(item, (torch.Tensor, list)) for item in value)


# ---------------------------------------------------------------------------------------------------------- the blend
def blend_rows(
    base: Prediction | None, members: list[Prediction], weights: list[float] | torch.Tensor, kl_scale: float
) -> Prediction:
    """:func:`~diffusion_blend.blend.blend_predictions` of batched predictions — with ``weights`` a (rows, members)
    table, :func:`~diffusion_blend.blend.blend_per_row` — sample by sample for lists, field by field for
    several-output denoisers."""
    if not members:  # (λ = 0, or no weight on any member)
        return base
    if base is None:
        return per_field(lambda *fields: _blend_field(None, fields, weights, kl_scale), *members)
    return per_field(lambda b, *fields: _blend_field(b, fields, weights, kl_scale), base, *members)


def _blend_field(base: Rows | None, members: tuple[Rows, ...], weights: Any, kl_scale: float) -> Rows:
    per_row = isinstance(weights, torch.Tensor)
    if not isinstance(members[0], list):
        return (blend_per_row if per_row else blend_predictions)(base, list(members), weights, kl_scale)
    bases = base if base is not None else [None] * len(members[0])
    if not per_row:
        return [blend_predictions(b, list(samples), weights, kl_scale) for b, *samples in zip(bases, *members)]
    return [  # each sample as a batch of one row
        blend_per_row(
            None if b is None else b[None], [sample[None] for sample in samples], weights[row : row + 1], kl_scale
        )[0]
        for row, (b, *samples) in enumerate(zip(bases, *members))
    ]


# ----------------------------------------------------------------------------------------------- rows of predictions
def like(batch: Rows) -> torch.Tensor:
    """A tensor of the batch's device and dtype (its first; lists of lists in Z-Image's omni mode)."""
    return tensors_of(batch)[0]


def tensors_of(sample: Any) -> list[torch.Tensor]:
    """The tensors of a sample (or batch), in order: itself, or those of its (nested) list."""
    if isinstance(sample, torch.Tensor):
        return [sample]
    return [tensor for item in sample for tensor in tensors_of(item)]


def joined(pieces: list[Prediction]) -> Prediction:
    """Predictions of consecutive rows, one after another."""
    return per_field(
        lambda *rows: torch.cat(rows) if isinstance(rows[0], torch.Tensor) else list(itertools.chain(*rows)), *pieces
    )


def split_rows(stacked: Prediction, sizes: list[int]) -> list[Prediction]:
    """Consecutive rows of ``sizes`` rows each."""
    if isinstance(stacked, Fields):
        return [Fields(parts) for parts in zip(*(split_rows(field, sizes) for field in stacked))]
    if isinstance(stacked, torch.Tensor):
        return list(stacked.split(sizes))
    starts = list(itertools.accumulate(sizes, initial=0))
    return [stacked[start:stop] for start, stop in zip(starts, starts[1:])]


def placed_rows(batch: int, parts: list[tuple[torch.Tensor, Prediction]]) -> Prediction:
    """The predictions of parts of the batch (their rows, their predictions) put back in the batch's order."""
    rows = [part_rows for part_rows, _ in parts]
    return per_field(lambda *predictions: _placed_field(batch, rows, predictions), *(p for _, p in parts))


def _placed_field(batch: int, rows: list[torch.Tensor], predictions: tuple[Rows, ...]) -> Rows:
    last = predictions[-1]
    if isinstance(last, torch.Tensor):
        placed = last.new_empty((batch, *last.shape[1:]))
        for part_rows, prediction in zip(rows, predictions):
            placed[part_rows] = prediction
        return placed
    by_sample: list[torch.Tensor] = [None] * batch  # type: ignore[list-item]
    for part_rows, prediction in zip(rows, predictions):
        for row, sample in zip(part_rows.tolist(), prediction):
            by_sample[row] = sample
    return by_sample


def member_of_stacked(stacked: Prediction, member: int) -> Prediction:
    """One member's prediction from a vmapped call's (members first)."""
    return per_field(
        lambda rows: rows[member] if isinstance(rows, torch.Tensor) else [sample[member] for sample in rows], stacked
    )


def cloned(prediction: Prediction) -> Prediction:
    """A copy of a prediction's tensors (a CUDA graph's outputs are overwritten by its next replay)."""
    return per_field(
        lambda rows: rows.clone() if isinstance(rows, torch.Tensor) else [cloned(item) for item in rows], prediction
    )
