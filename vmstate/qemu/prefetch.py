"""Mapping an input file in a thread, started before the heavy imports and parsing of split
and join, so that populating its page tables (and reading it from disk where it is not in the
page cache, as for a core just written around the page cache) overlaps with them.
mmap releases the GIL, so the thread runs while the command goes on. Keep this module's
imports light: it is imported first."""

from __future__ import annotations

import mmap
import os
import threading

from ..errors import VmstateError
from ..fd import open_to_read


class BackgroundMapping:
    """A read-only shared mapping of the regular file `path`, its pages populated, made by a
    thread started at once. `result()` waits for it: the mmap (b"" for an empty file), or
    the error opening it raised (`open_to_read`'s, naming WHAT)."""

    def __init__(self, path: str, what: str, error: type[VmstateError]):
        self._mapping = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._map, args=(path, what, error),
                                        name="map-input", daemon=True)
        self._thread.start()

    def _map(self, path: str, what: str, error: type[VmstateError]) -> None:
        try:
            fd = open_to_read(path, what, error)
            try:
                size = os.fstat(fd).st_size
                self._mapping = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                          mmap.PROT_READ) if size else b""
            finally:
                os.close(fd)
        except BaseException as e:          # handed to the caller of result()
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._mapping
