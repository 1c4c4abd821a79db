"""Writing a stream of page records (join's output) from where the pages lie in a mapped
input (the core's blocks) through the page cache, with pwritev: the kernel copies each page
straight from the input's mapping into the output's page cache, one copy per byte as `cp`
makes, with no staging buffer in user space. A QEMU stream's pages are 4104 bytes apart (an
8-byte record header before each), so copy_file_range or sendfile would take one call per
page; pwritev takes one per RECORDS_PER_CALL records, a header and a page iovec each.

The memory an iovec points into must stay mapped until the write returns."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ..fd import allocate
from . import layout

RECORDS_PER_CALL = os.sysconf("SC_IOV_MAX") // 2     # (header, page) iovec pairs per pwritev
COALESCE_BYTES = 1 << 16                            # small writes are gathered into one buffer
IOVEC_WORDS = 2                                     # struct iovec: base, length

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_libc.pwritev.restype = ctypes.c_ssize_t


def pwritev_all(fd: int, iovecs, count: int, offset: int) -> int:
    """Write the buffers of the first `count` iovecs of `iovecs` (a ctypes u64 array of
    base, length pairs) back to back from `offset`, resuming after a short write (the array
    is changed then); returns the bytes written. ctypes releases the GIL for each call."""
    start, first = offset, 0
    while first < count:
        written = _libc.pwritev(fd, ctypes.byref(iovecs, first * IOVEC_WORDS * 8),
                                count - first, offset)
        if written <= 0:
            err = ctypes.get_errno() if written < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        offset += written
        while first < count and written >= iovecs[first * IOVEC_WORDS + 1]:
            written -= iovecs[first * IOVEC_WORDS + 1]
            first += 1
        if written:                         # a short write ended inside this buffer
            iovecs[first * IOVEC_WORDS] += written
            iovecs[first * IOVEC_WORDS + 1] -= written
    return offset - start


class GatherWriter:
    """An output file descriptor written through the page cache as a sequential stream from
    `position` (`write`, `write_page_records`, then `finish`), each write's blocks allocated
    first. Small writes are gathered into one buffer and go out with the next large one."""

    def __init__(self, fd: int, position: int = 0):
        self.fd = fd
        self.position = position        # file offset of the next sequential byte
        self.small = bytearray()        # sequential bytes not written yet
        self._headers = ctypes.create_string_buffer(RECORDS_PER_CALL * layout.U64.size)
        self._iovecs = (ctypes.c_uint64 * (RECORDS_PER_CALL * 2 * IOVEC_WORDS))()

    def write(self, data) -> None:
        self.small += memoryview(data).cast("B")
        if len(self.small) >= COALESCE_BYTES:
            self._flush_small()

    def write_page_records(self, first_header: int, pages_address: int, count: int) -> None:
        """`count` PAGE records: headers `first_header`, then one page more each; their
        pages back to back in memory from `pages_address`."""
        self._flush_small()
        size, header_size = layout.PAGE_SIZE, layout.U64.size
        headers_address = ctypes.addressof(self._headers)
        for begin in range(0, count, RECORDS_PER_CALL):
            n = min(RECORDS_PER_CALL, count - begin)
            header = first_header + begin * size
            struct.pack_into(f">{n}Q", self._headers, 0, *range(header, header + n * size, size))
            iovecs, end = self._iovecs, 2 * IOVEC_WORDS * n
            iovecs[0:end:4] = range(headers_address, headers_address + header_size * n,
                                    header_size)
            iovecs[1:end:4] = [header_size] * n
            page = pages_address + begin * size
            iovecs[2:end:4] = range(page, page + size * n, size)
            iovecs[3:end:4] = [size] * n
            allocate(self.fd, self.position, n * layout.PAGE_RECORD)
            self.position += pwritev_all(self.fd, iovecs, 2 * n, self.position)

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
