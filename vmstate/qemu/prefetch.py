"""Mapping an input file in a thread, started before the heavy imports and parsing of split
and join, so that opening and mapping it, and reading it from disk where it is not in the page
cache (as for a core just written around the page cache), overlap with them and with the
writing of the output. mmap and posix_fadvise release the GIL, so the thread runs while the
command goes on. Keep this module's imports light: it is imported first."""

from __future__ import annotations

import mmap
import os
import threading

from ..errors import VmstateError
from ..fd import open_to_read


READAHEAD_STEP = 32 << 20       # bytes the reading-ahead thread asks the kernel for at once


class BackgroundMapping:
    """A read-only shared mapping of the regular file `path`, made by a thread started at
    once. `result()` waits for the mapping (b"" for an empty file), or raises the error
    opening it raised (`open_to_read`'s, naming WHAT). The thread then goes on asking the
    kernel to read the whole file ahead, a step at a time, while the caller already works
    on its first bytes: a file that is not in the page cache (a core just written around
    it) is read from disk while the output is written, not before."""

    def __init__(self, path: str, what: str, error: type[VmstateError]):
        self._mapping = None
        self._error: BaseException | None = None
        self._mapped = threading.Event()
        self._thread = threading.Thread(target=self._map, args=(path, what, error),
                                        name="map-input", daemon=True)
        self._thread.start()

    def _map(self, path: str, what: str, error: type[VmstateError]) -> None:
        fd = None
        try:
            fd = open_to_read(path, what, error)
            size = os.fstat(fd).st_size
            self._mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else b""
        except BaseException as e:          # handed to the caller of result()
            self._error = e
        self._mapped.set()
        try:
            if self._error is None:
                for offset in range(0, size, READAHEAD_STEP):      # releases the GIL
                    os.posix_fadvise(fd, offset, READAHEAD_STEP, os.POSIX_FADV_WILLNEED)
        finally:
            if fd is not None:
                os.close(fd)

    def result(self):
        self._mapped.wait()
        if self._error is not None:
            raise self._error
        return self._mapping
