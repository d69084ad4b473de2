"""Legacy torch checkpoints (``.bin``, ``.pt``, ``.pth``) read without running code: ``torch.load(weights_only=True)``
builds tensors and plain containers only, and a file that asks for anything else — a pickle payload — is refused.
The basis loader and the reward models both read such files through :func:`read_weights_only`."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def read_weights_only(path: Path) -> object:
    """The checkpoint's content; raise ``ValueError`` with a one-line reason (a file whose pickle would build other
    Python objects, which loading could run as code, is told apart from one that is not a checkpoint at all)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if runs_code(error):
            raise ValueError(
                f"{path} holds Python objects besides tensors, which loading could run as code: refused (save the "
                "weights as .safetensors)"
            ) from None
        raise ValueError(f"{path} is not a torch checkpoint ({first_line(error)})") from None
    except Exception as error:
        raise ValueError(f"cannot read {path} as a weights-only torch checkpoint ({first_line(error)})") from None


def runs_code(error: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only loader refused a pickle for the Python objects it would build, rather than for
    not being a pickle at all (a truncated file, a Git LFS pointer)."""
    return "Unsupported global" in str(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
