"""Files written whole or not at all: outputs appear only once every one of them is complete (temp file, then
rename), so a failure or a kill never leaves a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def write_atomically(files: Mapping[Path, Callable[[Path], object]]) -> None:
    """Write each file through ``write(temp_path)`` into a temp file beside it; only once all are written are they
    renamed into place, so a failure leaves none of them (nor a folder made for them)."""
    made_folders = [folder for path in files for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    temps: list[tuple[Path, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
            os.close(handle)
            temps.append((Path(temp), path))
            write(Path(temp))
            os.chmod(temp, 0o666 & ~umask)  # mkstemp's 0600 would make the result private to its writer
        for temp, path in temps:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        for folder in sorted(set(made_folders), key=lambda folder: len(folder.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
