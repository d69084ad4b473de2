"""Where ``generate`` writes: a grid image file, or a folder of one PNG per image, each with its settings file,
checked before any model is loaded and written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from ..files import write_atomically
from ..images import image_grid
from .running import CommandError

#: Image files ``--out`` may name (a grid of all images); any other ``--out`` is a folder (one PNG per image)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: What ``generate`` writes into an output folder (an earlier run's would mix with a new one's)
FOLDER_OUTPUTS = ("image-*.png", "settings.json")


@dataclasses.dataclass(frozen=True)
class Output:
    """Where ``generate`` writes: a grid image file (and its settings beside it), or a folder of one PNG per image
    (and ``settings.json``)."""

    path: Path
    image: bool

    @classmethod
    def parse(cls, text: str) -> Output:
        """``--out``: an image file by its suffix, a folder where it ends in a slash, has no suffix or exists."""
        if not text.strip():
            raise CommandError("--out is empty: give an image file (.png, ...) or a folder (ending in /)")
        path = Path(text).expanduser()
        if text.endswith(("/", os.sep)):
            return cls(path, image=False)
        if path.suffix.lower() in IMAGE_FORMATS:
            return cls(path, image=True)
        if path.suffix and not path.is_dir():
            raise CommandError(
                f"--out: {text} is neither an image file ({', '.join(IMAGE_FORMATS)}) nor a folder "
                "(end it with / for a folder)"
            )
        return cls(path, image=False)

    @property
    def sidecar(self) -> Path:
        """The settings file: beside a grid image (``car.json`` for ``car.png``), or in the output folder."""
        return self.path.with_suffix(".json") if self.image else self.path / "settings.json"


def save_images(images: list, out: Output, settings: dict, columns: int | None = None) -> list[Path]:
    """A grid image, or one PNG per image in a folder; plus the settings file."""
    if out.image:
        targets = [(out.path, image_grid(images, columns), IMAGE_FORMATS[out.path.suffix.lower()])]
    else:
        targets = [(out.path / f"image-{index:03d}.png", image, "PNG") for index, image in enumerate(images)]
    settings = {**settings, "outputs": [path.name for path, _, _ in targets]}
    files = {
        path: lambda temp, image=image, image_format=image_format: image.save(temp, format=image_format)
        for path, image, image_format in targets
    }
    files[out.sidecar] = lambda temp: temp.write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n")
    write_atomically(files)
    return list(files)


def check_out(out: Output) -> None:
    """``--out`` can be written, before any model is loaded: an image file (not a folder) or a folder without an
    earlier run's outputs, its settings file not a folder, somewhere writable."""
    path = out.path
    if out.image and path.is_dir():
        raise CommandError(f"--out: {path} is a folder")
    if not out.image:
        if path.exists() and not path.is_dir():
            raise CommandError(f"--out: {path} exists and is not a folder")
        earlier = (
            sorted(found.name for pattern in FOLDER_OUTPUTS for found in path.glob(pattern)) if path.is_dir() else []
        )
        if earlier:
            raise CommandError(
                f"--out: {path} holds an earlier run's outputs ({', '.join(earlier[:3])}"
                f"{', ...' if len(earlier) > 3 else ''}); give a new or empty folder"
            )
    if out.sidecar.is_dir():
        raise CommandError(f"--out: the settings file {out.sidecar} would replace a folder")
    existing = next(parent for parent in (path.parent if out.image else path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise CommandError(f"--out: cannot write under {existing} (not a folder)")
    try:  # as the outputs will be written: a temp file in the folder (os.access alone passes /proc for root)
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".diffusion-blend-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise CommandError(f"--out: cannot write under {existing} ({error.strerror or error})") from None
