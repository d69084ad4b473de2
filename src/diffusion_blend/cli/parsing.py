"""The written forms of the CLI's repeated and list options: ``--basis NAME=PATH``, ``--option NAME=VALUE``,
``--weights-path [NAME=]PATH`` and comma-separated numbers. (Weights, ``NAME=W,...``, are read by
``named_numbers.py``: reward specs and oracle names use that form too.)"""

from __future__ import annotations

from .running import CommandError

#: ``--basis NAME@DENOISER=base``: the pipeline's own denoiser (a basis fine-tuned on another denoiser only)
BASE_SOURCE = "base"


def parse_basis(items: list[str]) -> dict[str, str | None | dict[str, str | None]]:
    """``["a=lora", "b@transformer=high", "b@transformer_2=base"]`` → ``{"a": "lora", "b": {"transformer": "high",
    "transformer_2": None}}``: a path, or a path per denoiser of a pipeline that has several (Wan 2.2), where
    ``base`` names the pipeline's own denoiser (one the basis leaves unchanged; a folder called base is ``./base``)."""
    basis: dict[str, str | None | dict[str, str | None]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        name, at, denoiser = (part.strip() for part in key.partition("@"))
        if not sep or not name or not path.strip() or (at and not denoiser):
            raise CommandError(f"--basis: {item!r} is not NAME=PATH or NAME@DENOISER=PATH")
        given = basis.get(name)
        if name in basis and (not at or not isinstance(given, dict) or denoiser in given):
            raise CommandError(f"--basis: {name!r}{f' for {denoiser}' if at else ''} is given twice")
        source = None if path.strip() == BASE_SOURCE else path.strip()
        if at:
            basis.setdefault(name, {})[denoiser] = source
        else:
            basis[name] = source
    return basis


def paths_of(basis: dict[str, str | None | dict[str, str | None]]) -> list[str]:
    """Every path of a parsed ``--basis`` (not the base's own denoisers)."""
    return [
        path
        for source in basis.values()
        for path in (source.values() if isinstance(source, dict) else [source])
        if path is not None
    ]


def parse_options(items: list[str]) -> dict[str, int | float | bool]:
    """``--option NAME=VALUE`` → a method option (an integer, a number, or true/false)."""
    options: dict[str, int | float | bool] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise CommandError(f"--option: {item!r} is not NAME=VALUE")
        name = name.replace("-", "_")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"
            continue
        try:
            options[name] = int(value)
        except ValueError:
            try:
                options[name] = float(value)
            except ValueError:
                raise CommandError(f"--option: {name} = {value!r} is not a number") from None
    return options


def parse_named_texts(items: list[str], option: str) -> dict[str, str]:
    """``NAME=TEXT`` items (each name once)."""
    named = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not name.strip() or not text.strip():
            raise CommandError(f"{option} takes NAME=SPEC, got {item!r}")
        if name.strip() in named:
            raise CommandError(f"{option} gives {name.strip()!r} twice")
        named[name.strip()] = text.strip()
    return named


def parse_weights_paths(items: list[str] | None, names: list[str]) -> dict[str, str]:
    """``--weights-path`` values → reward name → path: ``NAME=PATH``, or a bare ``PATH`` when there is one reward."""
    paths: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if sep and name in names:
            paths[name] = path
        elif len(names) == 1:
            paths[names[0]] = item
        else:
            raise CommandError(f"--weights-path: {item!r} must be NAME=PATH with NAME one of {', '.join(names)}")
    return paths


def float_list(text: str, what: str) -> list[float]:
    """``"2,1,0.5"`` → ``[2.0, 1.0, 0.5]``; at least one number."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise CommandError(f"{what}: give at least one number")
    return values
