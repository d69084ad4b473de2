"""Training checkpoints: the whole state of a run in safetensors and JSON (no pickle), written atomically.

A state is any nesting of dicts, lists, tuples, tensors, numbers, strings and None (a model's parameters, an
optimizer's and a learning-rate scheduler's state dicts, RNG states, a method's buffers). :func:`pack` splits it into
its tensors (one safetensors file) and a JSON skeleton naming them; :func:`unpack` joins them again, exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` with one pair of files per process (``rank-R``), written under
a temporary name and renamed into place once every process has written its files; older checkpoints are removed
after the new one is in place, so a kill at any moment leaves at least one complete checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


def pack(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by key, a JSON-able skeleton in which each tensor is ``{"__tensor__": key}``)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(value, dict):  # keys keep their type (optimizer states are keyed by int)
            return {_DICT: [[walk(key), walk(item)] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(item) for item in value]}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT: repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__}")

    return tensors, walk(state)


def unpack(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The state :func:`pack` split."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, dict):
            if _TENSOR in value:
                return tensors[value[_TENSOR]]
            if _TUPLE in value:
                return tuple(walk(item) for item in value[_TUPLE])
            if _FLOAT in value:
                return float(value[_FLOAT])
            return {walk(key): walk(item) for key, item in value[_DICT]}
        return value

    return walk(skeleton)


def save_rank(folder: Path, rank: int, state: Any) -> None:
    """One process's share of a checkpoint, into ``folder`` (the checkpoint's temporary folder)."""
    tensors, skeleton = pack(state)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, folder / f"rank-{rank}.safetensors")
    (folder / f"rank-{rank}.json").write_text(json.dumps(skeleton))


def load_rank(folder: Path, rank: int) -> Any:
    path = folder / f"rank-{rank}.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint {folder} has no state for process {rank} (was it written by fewer processes?)")
    return unpack(safetensors.torch.load_file(path), json.loads((folder / f"rank-{rank}.json").read_text()))


def staging_folder(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f".{PREFIX}{step:07d}.partial"


def publish(out: Path, step: int, world_size: int) -> Path:
    """Rename the staged checkpoint of ``step`` into place (every process has written it), then drop older ones."""
    staged = staging_folder(out, step)
    missing = [rank for rank in range(world_size) if not (staged / f"rank-{rank}.json").is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {step}: processes {missing} wrote no state")
    final = out / CHECKPOINTS / f"{PREFIX}{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    for older in (out / CHECKPOINTS).iterdir():
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    folder = out / CHECKPOINTS
    found = sorted(path for path in folder.glob(f"{PREFIX}*") if path.is_dir()) if folder.is_dir() else []
    return found[-1] if found else None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX) :])
