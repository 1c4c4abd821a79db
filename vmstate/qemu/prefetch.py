"""Mapping an input file in a thread (join's core), so that opening and mapping it, reading
it from disk where it is not in the page cache, and filling in the mapping's page tables
overlap with the work before its bytes are needed. Keep this module's imports light."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

from ..errors import VmstateError
from ..fd import open_to_read

POPULATE_STEP = 32 << 20       # bytes of the mapping filled in per madvise call
MADV_POPULATE_READ = 22         # Linux 5.14

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _Buffer(ctypes.Structure):
    """Py_buffer (the stable ABI's), to learn where a read-only mapping lies: ctypes'
    from_buffer wants a writable one."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def mapping_address(mapping: mmap.mmap) -> int:
    """Where a mapping (read-only ones too) lies in this process."""
    view = _Buffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(mapping), ctypes.byref(view), 0)
    try:
        return view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


class BackgroundMapping:
    """A read-only shared mapping of the regular file `path`, made by a thread started at
    once. `result()` waits for the mapping (b"" for an empty file), or raises the error
    opening it raised (`open_to_read`'s, naming WHAT). The thread then goes on filling in
    the mapping's page tables (MADV_POPULATE_READ, reading from disk what is not cached), a
    step at a time from the start, while the caller already works on the first bytes: the
    caller then takes no page faults (with ctypes the GIL is released for each step; faults
    taken by the copies instead cost about twice as much CPU). Where the kernel lacks
    MADV_POPULATE_READ it asks for the file to be read ahead instead."""

    def __init__(self, path: str, what: str, error: type[VmstateError]):
        self._mapping = None
        self.identity: tuple[int, int] | None = None     # the file's (st_dev, st_ino)
        self._error: BaseException | None = None
        self._mapped = threading.Event()
        self._thread = threading.Thread(target=self._map, args=(path, what, error),
                                        name="map-input", daemon=True)
        self._thread.start()

    def _map(self, path: str, what: str, error: type[VmstateError]) -> None:
        fd = None
        try:
            fd = open_to_read(path, what, error)
            status = os.fstat(fd)
            size, self.identity = status.st_size, (status.st_dev, status.st_ino)
            self._mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else b""
            address = mapping_address(self._mapping) if size else 0    # before the caller may close it
        except BaseException as e:          # handed to the caller of result()
            self._error = e
        self._mapped.set()
        try:
            if self._error is None and size:
                self._populate(fd, self._mapping, address, size)
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _populate(fd: int, mapping: mmap.mmap, address: int, size: int) -> None:
        for offset in range(0, size, POPULATE_STEP):
            if mapping.closed:              # the caller is done with it (or failed)
                return
            length = min(POPULATE_STEP, size - offset)
            if _libc.madvise(address + offset, length, MADV_POPULATE_READ) == 0:
                continue
            if ctypes.get_errno() == errno.EINVAL:                  # an older kernel
                for rest in range(offset, size, POPULATE_STEP):
                    os.posix_fadvise(fd, rest, POPULATE_STEP, os.POSIX_FADV_WILLNEED)
            return          # or unmapped meanwhile, or a read error (the caller meets it)

    def result(self):
        self._mapped.wait()
        if self._error is not None:
            raise self._error
        return self._mapping
