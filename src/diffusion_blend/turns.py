"""Calls of blends on one pipeline take turns.

A call swaps the pipeline's denoiser for its :class:`~diffusion_blend.denoiser.BlendedDenoiser` and sets the blend
on it for the whole denoising loop; two calls at once on the same pipeline or base denoiser (one ``Blend`` used from
two threads, or two ``Blend``\\ s on one pipeline) would mix each other's weights into their images, and loading or
unloading a basis meanwhile would change them. So a call (and a Blend's loading and unloading) holds the turn of its
pipeline and base denoisers: a call from another thread waits until it is done, and gets its own result; a call
from the thread that holds the turn (a pipeline callback calling the blend again) is refused.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any


class Turn:
    """One denoiser's turn: a lock and the thread holding it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.holder: int | None = None


#: id of a pipeline or denoiser → its turn (dropped when the object is collected)
_TURNS: dict[int, Turn] = {}
_TURNS_GUARD = threading.Lock()


def _turn_of(holder: Any) -> Turn:
    key = id(holder)
    if key not in _TURNS:
        _TURNS[key] = Turn()
        try:
            weakref.finalize(holder, _TURNS.pop, key, None)
        except TypeError:  # an object without weak references keeps its turn for the process
            pass
    return _TURNS[key]


@contextlib.contextmanager
def taking_turns(holders: Iterable[Any]) -> Iterator[None]:
    """Hold the turn of a call's pipeline and base denoisers (in one fixed order, so that two calls cannot wait on
    each other)."""
    with _TURNS_GUARD:
        turns = [_turn_of(holder) for holder in sorted({id(holder): holder for holder in holders}.values(), key=id)]
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
