"""Files that are whole or absent: written under a temporary name, flushed, then renamed."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, flush it to disk, then rename it over ``path``
    (one atomic step: a reader, or a process killed at any point, sees the old file or the new one),
    then flush the folder too.
    The file gets the permissions ``open`` would give a new file (``mkstemp``'s are private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Flush the folder's entries, so that the rename, too, survives a power cut (POSIX; elsewhere
    the rename is what there is)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
