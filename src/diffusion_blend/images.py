"""Pictures made of several images."""

from __future__ import annotations

import math
from typing import Any


def image_grid(images: list, columns: int | None = None) -> Any:
    """The PIL images side by side in a grid of ``columns`` (default: near-square), row by row."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
