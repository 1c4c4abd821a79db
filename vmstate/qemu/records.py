"""Reading a run of a QEMU stream's page records in bulk, without mapping the stream: one
preadv per up to RECORDS_PER_READ records scatters each record's 8-byte header into one
buffer and its payload (a PAGE record's 4096 bytes, a ZERO record's fill byte) into another,
so the headers are checked with one comparison and a PAGE run's pages lie back to back,
ready for one write or hash call. The cost follows the bytes: a run's first read takes
FIRST_READ records, each next one twice as many as the one before (all matched), so the
records read past a run's end are at most FIRST_READ or as many as the run has.

A record matches when it continues the run exactly: the next page of the block, the same
kind with RAM_CONTINUE, and for ZERO records the same fill byte."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import layout

RECORDS_PER_READ = 512        # (header, payload) iovec pairs per preadv: IOV_MAX / 2
FIRST_READ = 8                # records in a run's first read

_libc = ctypes.CDLL(None, use_errno=True)
_libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_libc.preadv.restype = ctypes.c_ssize_t


class RecordStaging:
    """The buffers and iovecs for up to RECORDS_PER_READ records of one payload size."""

    def __init__(self, payload_size: int):
        self.record_size = layout.U64.size + payload_size
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.headers = mmap.mmap(-1, RECORDS_PER_READ * layout.U64.size, private)
        self.payloads = mmap.mmap(-1, RECORDS_PER_READ * payload_size, private)
        self.iovecs = record_iovecs(_address(self.headers), _address(self.payloads),
                                    payload_size, RECORDS_PER_READ)

    def read(self, fd: int, offset: int, count: int) -> int:
        """Read `count` records from `offset`; the number read whole (fewer at the end of
        the file)."""
        while True:
            got = _libc.preadv(fd, self.iovecs, 2 * count, offset)
            if got >= 0:
                return got // self.record_size
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    def close(self) -> None:
        self.headers.close()
        self.payloads.close()


def record_iovecs(headers_at: int, payloads_at: int, payload_size: int, count: int):
    """`count` (header, payload) iovec pairs as a ctypes u64 array: record i's 8-byte header
    at headers_at + 8 i, its payload at payloads_at + i payload_size (both buffers must
    outlive the array's use)."""
    header_size = layout.U64.size
    iovecs = (ctypes.c_uint64 * (4 * count))()
    iovecs[0::4] = range(headers_at, headers_at + count * header_size, header_size)
    iovecs[1::4] = [header_size] * count
    iovecs[2::4] = range(payloads_at, payloads_at + count * payload_size, payload_size)
    iovecs[3::4] = [payload_size] * count
    return iovecs


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def matching(staging: RecordStaging, count: int, first_header: int, fill: int | None) -> int:
    """How many of the `count` records just read continue the run: their headers are
    `first_header` plus a page each, and (ZERO records) their fill byte is `fill`."""
    expected = layout.page_headers(first_header, count)
    actual = staging.headers[:count * layout.U64.size]
    good = count if actual == expected else _common_records(actual, expected)
    if fill is not None:
        fills = staging.payloads[:good]
        good -= len(fills.lstrip(bytes([fill])))
    return good


def _common_records(actual: bytes, expected: bytes) -> int:
    """The number of leading 8-byte records two strings share (binary search on prefixes)."""
    low, high = 0, len(expected) // layout.U64.size
    while low < high:
        middle = (low + high + 1) // 2
        if actual[:middle * layout.U64.size] == expected[:middle * layout.U64.size]:
            low = middle
        else:
            high = middle - 1
    return low


def read_run(fd: int, staging: RecordStaging, offset: int, first_header: int, limit: int,
             fill: int | None, sink=None) -> int:
    """Read the records that continue a run from `offset` (where its first record is, whose
    header is `first_header`), at most `limit`; returns how many continue it. `sink(index,
    payloads, count)` gets each stretch of matching records as read: `payloads` holds
    their payloads back to back, `index` is the first one's place in the run."""
    found, want = 0, FIRST_READ
    while found < limit:
        count = staging.read(fd, offset + found * staging.record_size,
                             min(want, limit - found, RECORDS_PER_READ))
        if count == 0:
            break
        good = matching(staging, count, first_header + found * layout.PAGE_SIZE, fill)
        if good and sink is not None:
            sink(found, staging.payloads, good)
        found += good
        if good < count:
            break
        want = 2 * count
    return found
