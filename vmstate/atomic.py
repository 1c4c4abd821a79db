"""Atomic output files: write to a temporary file beside the target, fsync, rename.

An interrupted command leaves at most a hidden `.NAME.*.part` file, never a half-written file
under the final name."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

from .errors import VmstateError


@contextmanager
def atomic_output(path: str):
    """Yield a binary file object; on success it becomes `path`, on any error it vanishes."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part",
                                         dir=directory)
    except OSError as e:
        raise VmstateError(f"cannot create {path}: {e.strerror}") from None
    f = os.fdopen(fd, "w+b")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.rename(temporary, path)
    except BaseException:
        f.close()
        os.unlink(temporary)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
