"""Named numbers written as text, ``"a=0.3,b=0.7"``: how weights are given at the CLI (``--weights``), in reward
specs (``"ir=0.5,aes=0.5"``) and in the names of MORL oracles (``"bold=0.25,stencil=0.75"``)."""

from __future__ import annotations

import math


def parse_named_numbers(text: str, what: str = "weights", bare: float | None = None) -> dict[str, float]:
    """``"a=0.3,b=0.7"`` → ``{"a": 0.3, "b": 0.7}`` (how weights are written at the CLI); a bare name counts as
    ``bare`` when given, else it is an error. Raise on empty items, non-numbers, non-finite values and repeats."""
    values: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"{what}: empty item in {text!r}")
        name, sep, value = item.rpartition("=") if "=" in item else (item, "", "")
        name = name.strip()
        if not name or (not sep and bare is None):
            raise ValueError(f"{what}: {item!r} is not NAME=NUMBER")
        if name in values:
            raise ValueError(f"{what}: {name!r} is given twice")
        try:
            number = float(value) if sep else float(bare)
        except ValueError:
            raise ValueError(f"{what}: {value.strip()!r} (for {name!r}) is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{what}: {name!r} is {value.strip()}: weights must be finite numbers")
        values[name] = number
    return values
