"""Calls of blends on one denoiser take turns.

A call swaps the pipeline's denoiser for its :class:`~diffusion_blend.denoiser.BlendedDenoiser` and sets the blend
on it for the whole denoising loop; two calls at once on the same base denoiser (one ``Blend`` used from two
threads, or two ``Blend``\\ s on one pipeline) would mix each other's weights into their images. So a call holds its
base denoisers' turn: a call from another thread waits until it is done, and gets its own result; a call from the
thread that holds the turn (a pipeline callback calling the blend again) is refused.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator

from torch import nn


class Turn:
    """One denoiser's turn: a lock and the thread holding it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.holder: int | None = None


_TURNS: weakref.WeakKeyDictionary[nn.Module, Turn] = weakref.WeakKeyDictionary()
_TURNS_GUARD = threading.Lock()


@contextlib.contextmanager
def taking_turns(bases: Iterable[nn.Module]) -> Iterator[None]:
    """Hold the turn of every base denoiser of a call (in one fixed order, so two calls cannot wait on each other)."""
    with _TURNS_GUARD:
        turns = [_TURNS.setdefault(base, Turn()) for base in sorted(set(bases), key=id)]
    me = threading.get_ident()
    if any(turn.holder == me for turn in turns):
        raise ValueError(
            "a blend on this denoiser is in the middle of a call (blend() from a callback of its own call?): one "
            "call at a time"
        )
    with contextlib.ExitStack() as held:
        for turn in turns:
            turn.lock.acquire()
            held.callback(turn.lock.release)
            turn.holder = me
            held.callback(setattr, turn, "holder", None)
        yield
