"""Writing a stream of page records (join's output) from where the pages lie in a mapped
input (the core's blocks) through the page cache, with pwritev: the kernel copies each page
straight from the input's mapping into the output's page cache, one copy per byte as `cp`
makes, with no staging buffer in user space. A QEMU stream's pages are 4104 bytes apart (an
8-byte record header before each), so copy_file_range or sendfile would take one call per
page, pwritev takes one per IOV_MAX / 2 records.

An iovec array is rows of (address, length), built with numpy from a view's data pointer
and strides; the memory a row points into must stay mapped until the write returns."""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from ..fd import allocate

IOV_MAX = os.sysconf("SC_IOV_MAX")          # iovecs per pwritev (1024 on Linux)
COALESCE_BYTES = 1 << 16                     # small writes are gathered into one buffer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_libc.pwritev.restype = ctypes.c_ssize_t


def _pwritev(fd: int, iovecs: np.ndarray, offset: int) -> int:
    """One pwritev of the (n <= IOV_MAX, 2) uint64 rows; bytes written (ctypes releases the
    GIL for the call, so other threads run while the kernel copies)."""
    while True:
        written = _libc.pwritev(fd, iovecs.ctypes.data, len(iovecs), offset)
        if written > 0:
            return written
        err = ctypes.get_errno() if written < 0 else errno.EIO
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def pwritev_all(fd: int, iovecs: np.ndarray, offset: int) -> int:
    """Write every buffer the (n, 2) uint64 rows of `iovecs` point at, back to back from
    `offset`, IOV_MAX at a time, resuming after a short write; returns the bytes written."""
    pending = np.ascontiguousarray(iovecs, dtype=np.uint64)
    start = offset
    while len(pending):
        chunk = pending[:IOV_MAX]
        written = _pwritev(fd, chunk, offset)
        offset += written
        ends = np.cumsum(chunk[:, 1])
        whole = int(np.searchsorted(ends, written, side="right"))
        if whole == len(chunk):
            pending = pending[whole:]
            continue
        pending = pending[whole:].copy()         # a short write: go on inside a buffer
        cut = written - (int(ends[whole - 1]) if whole else 0)
        pending[0, 0] += cut
        pending[0, 1] -= cut
    return offset - start


def page_iovecs_each(rows: np.ndarray) -> np.ndarray:
    """One iovec per row of a (count, size) array whose rows are each contiguous (any row
    stride)."""
    count, size = rows.shape
    if rows.strides[1] != 1 and size > 1:
        raise ValueError("each row must be contiguous")
    iovecs = np.empty((count, 2), dtype=np.uint64)
    iovecs[:, 0] = np.arange(count, dtype=np.uint64) * np.uint64(rows.strides[0]) + \
        np.uint64(rows.ctypes.data)
    iovecs[:, 1] = size
    return iovecs


class GatherWriter:
    """An output file descriptor written through the page cache as a sequential stream from
    `position` (`write`, `write_records`, then `finish`), each write's blocks allocated
    first. Small writes are gathered into one buffer and go out with the next large one."""

    def __init__(self, fd: int, position: int = 0):
        self.fd = fd
        self.position = position        # file offset of the next sequential byte
        self.small = bytearray()        # sequential bytes not written yet

    def write(self, data) -> None:
        self.small += memoryview(data).cast("B")
        if len(self.small) >= COALESCE_BYTES:
            self._flush_small()

    def write_records(self, headers: np.ndarray, pages: np.ndarray) -> None:
        """Records of a header (rows of `headers`) then a page (rows of `pages`), each row
        contiguous: two iovecs per record."""
        count = len(pages)
        iovecs = np.empty((count, 2, 2), dtype=np.uint64)
        iovecs[:, 0] = page_iovecs_each(headers)
        iovecs[:, 1] = page_iovecs_each(pages)
        self._flush_small()
        allocate(self.fd, self.position, int(iovecs[:, :, 1].sum()))
        self.position += pwritev_all(self.fd, iovecs.reshape(2 * count, 2), self.position)

    def _flush_small(self) -> None:
        if self.small:
            allocate(self.fd, self.position, len(self.small))
            view = memoryview(self.small)
            while view:
                written = os.pwrite(self.fd, view, self.position)
                view, self.position = view[written:], self.position + written
            view.release()
            self.small = bytearray()

    def finish(self) -> int:
        """Write what is gathered; returns the file size."""
        self._flush_small()
        return self.position
