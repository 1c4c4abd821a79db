"""Writing a stream of page records (join's output) through the page cache: the pages of
RECORDS_PER_CALL records are read from the input file (the core's blocks, where they lie
back to back) into a buffer with one preadv, and written with one pwritev, a header and a
page iovec per record. A QEMU stream's pages are 4104 bytes apart (an 8-byte record header
before each), so copy_file_range or sendfile would take one call per page. Reading into a
buffer that stays in the cache costs a copy, but no page tables: copying from a mapping of
the input instead cost as much, and filling in its page tables made join's time vary from
run to run on this machine by up to five times."""

from __future__ import annotations

import ctypes
import errno
import os

from ..fd import allocate, pwrite_all, read_exactly
from . import layout
from .records import record_iovecs

RECORDS_PER_CALL = os.sysconf("SC_IOV_MAX") // 2     # (header, page) iovec pairs per pwritev
COALESCE_BYTES = 1 << 16                            # small writes are gathered into one buffer
ALLOCATE_BYTES = 32 << 20                           # the output's blocks allocated at a time
IOVEC_WORDS = 2                                     # struct iovec: base, length

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_libc.pwritev.restype = ctypes.c_ssize_t


def pwritev_all(fd: int, iovecs, count: int, offset: int, length: int) -> None:
    """Write the buffers of the first `count` iovecs of `iovecs` (a ctypes u64 array of
    base, length pairs; `length` bytes in all) back to back from `offset`, resuming after a
    short write (on a copy of the rest). ctypes releases the GIL for each call."""
    first, end = 0, offset + length
    copied = False
    while offset < end:
        written = _libc.pwritev(fd, ctypes.byref(iovecs, first * IOVEC_WORDS * 8),
                                count - first, offset)
        if written <= 0:
            err = ctypes.get_errno() if written < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        offset += written
        if offset == end:
            return
        while first < count and written >= iovecs[first * IOVEC_WORDS + 1]:
            written -= iovecs[first * IOVEC_WORDS + 1]
            first += 1
        if written:                         # a short write ended inside this buffer
            if not copied:
                words = (count - first) * IOVEC_WORDS
                rest = (ctypes.c_uint64 * words)(*iovecs[first * IOVEC_WORDS:count * IOVEC_WORDS])
                iovecs, count, first, copied = rest, count - first, 0, True
            iovecs[first * IOVEC_WORDS] += written
            iovecs[first * IOVEC_WORDS + 1] -= written


class GatherWriter:
    """An output file descriptor written through the page cache as a sequential stream from
    `position` (`write`, `write_page_records`, then `finish`), its blocks allocated
    ALLOCATE_BYTES ahead of the writes (`finish` cuts the file back to what was written).
    Small writes are gathered into one buffer and go out with the next large one."""

    def __init__(self, fd: int, position: int = 0):
        self.fd = fd
        self.position = position        # file offset of the next sequential byte
        self.small = bytearray()        # sequential bytes not written yet
        self._allocated = position      # blocks allocated up to here
        # A header and a page iovec per record, into two fixed buffers: they never change.
        self._headers = ctypes.create_string_buffer(RECORDS_PER_CALL * layout.U64.size)
        self._pages = ctypes.create_string_buffer(RECORDS_PER_CALL * layout.PAGE_SIZE)
        self._iovecs = record_iovecs(ctypes.addressof(self._headers),
                                     ctypes.addressof(self._pages), layout.PAGE_SIZE,
                                     RECORDS_PER_CALL)

    def write(self, data) -> None:
        self.small += memoryview(data).cast("B")
        if len(self.small) >= COALESCE_BYTES:
            self._flush_small()

    def write_page_records(self, first_header: int, source: int, offset: int,
                           count: int) -> None:
        """`count` PAGE records: headers `first_header`, then one page more each; their
        pages back to back in file `source` from `offset`."""
        self._flush_small()
        size = layout.PAGE_SIZE
        with memoryview(self._pages) as pages:
            for begin in range(0, count, RECORDS_PER_CALL):
                n = min(RECORDS_PER_CALL, count - begin)
                read_exactly(source, pages[:n * size], offset + begin * size)
                self._headers[:n * layout.U64.size] = \
                    layout.page_headers(first_header + begin * size, n)
                self._allocate(n * layout.PAGE_RECORD)
                pwritev_all(self.fd, self._iovecs, 2 * n, self.position, n * layout.PAGE_RECORD)
                self.position += n * layout.PAGE_RECORD

    def _allocate(self, length: int) -> None:
        if self.position + length > self._allocated:
            start = max(self.position, self._allocated)
            self._allocated = self.position + max(length, ALLOCATE_BYTES)
            allocate(self.fd, start, self._allocated - start)

    def _flush_small(self) -> None:
        if self.small:
            self._allocate(len(self.small))
            pwrite_all(self.fd, self.small, self.position)
            self.position += len(self.small)
            self.small = bytearray()

    def finish(self) -> int:
        """Write what is gathered, free the blocks allocated past it; returns the file
        size."""
        self._flush_small()
        if self._allocated > self.position:
            os.ftruncate(self.fd, self.position)
        return self.position
