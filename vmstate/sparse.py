"""Finding data in sparse files: which pages outside a present set hold non-zero bytes.

Only the parts of a file that the file system stores are read, so a 4 GiB region with a few
stored pages costs a few reads, not 4 GiB of zeros. The stored parts come from FIEMAP, many
extents per call, or, where the file system lacks it, from SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import fcntl
import operator
import os
import struct
from array import array

from .pages import Runs, bytemap_from_runs, is_zero, runs_from_bytemap
from .state import PAGE_SIZE

FS_IOC_FIEMAP = 0xC020660B                      # _IOWR('f', 11, struct fiemap)
FIEMAP = struct.Struct("<QQIIII")               # start, length, flags, mapped, count, reserved
FIEMAP_EXTENT = struct.Struct("<QQQ16xI12x")    # logical, physical, length, flags
EXTENT_WORDS = FIEMAP_EXTENT.size // 8          # the same extent as u64 words:
EXTENT_LOGICAL, EXTENT_LENGTH, EXTENT_FLAGS = 0, 2, 5   # flags in the low half (little-endian)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_BATCH = 4096                             # extents asked for per call


def data_segments(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, end) of the parts of [start, end) the file system stores (unwritten and
    delayed extents included: they may hold data not yet on disk), in file order."""
    try:
        segments = _fiemap_segments(fd, start, end)
    except OSError:                     # no FIEMAP here (tmpfs, some network file systems)
        segments = _seek_segments(fd, start, end)
    while segments and segments[-1][0] >= end:
        segments.pop()
    if segments:                        # extents may begin before start or run past end
        segments[0] = (max(segments[0][0], start), segments[0][1])
        segments[-1] = (segments[-1][0], min(segments[-1][1], end))
    return segments


def _fiemap_segments(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The extents, a batch per call, read as columns of u64 words (no Python per extent)."""
    buffer = bytearray(FIEMAP.size + FIEMAP_EXTENT.size * FIEMAP_BATCH)
    segments: list[tuple[int, int]] = []
    position = start
    while position < end:
        FIEMAP.pack_into(buffer, 0, position, end - position, 0, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer)
        mapped = FIEMAP.unpack_from(buffer)[3]
        if not mapped:
            break
        words = array("Q", buffer[FIEMAP.size:FIEMAP.size + mapped * FIEMAP_EXTENT.size])
        logical = words[EXTENT_LOGICAL::EXTENT_WORDS]
        length = words[EXTENT_LENGTH::EXTENT_WORDS]
        segments.extend(zip(logical, map(operator.add, logical, length)))
        position = max(position, segments[-1][1])
        if words[EXTENT_FLAGS - EXTENT_WORDS] & FIEMAP_EXTENT_LAST:
            break
    return segments


def _seek_segments(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    segments = []
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:                 # ENXIO: no more data (or no SEEK_DATA: nothing to skip)
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        segments.append((data, hole))
        position = hole
    return segments


def nonzero_pages_outside(fd: int, file_offset: int, view: memoryview, present: Runs,
                          first_page: int = 0, end_page: int | None = None) -> Runs:
    """Runs of pages of `view` (the file's bytes from `file_offset`) that are not in `present`
    but hold non-zero bytes, at page granularity. Only pages [first_page, end_page) are looked
    at (all by default), and `present` need hold only those. A stored part inside one present
    run (the usual case: the writer stores exactly the present pages) costs a comparison;
    only the others are looked at page by page."""
    page_count = len(view) // PAGE_SIZE
    end_page = page_count if end_page is None else end_page
    segments = data_segments(fd, file_offset + first_page * PAGE_SIZE,
                             file_offset + end_page * PAGE_SIZE)
    if segments == [(file_offset + first * PAGE_SIZE, file_offset + (first + count) * PAGE_SIZE)
                    for first, count in present]:
        return ()                       # the usual case, checked in one comparison
    suspect, index = [], 0
    for start, end in segments:
        first = (start - file_offset) // PAGE_SIZE
        last = (end - file_offset + PAGE_SIZE - 1) // PAGE_SIZE
        while index < len(present) and sum(present[index]) <= first:
            index += 1
        if index < len(present) and present[index][0] <= first \
                and last <= present[index][0] + present[index][1]:
            continue
        suspect.append((first, last - first))
    if not suspect:
        return ()
    absent = (int.from_bytes(bytemap_from_runs(tuple(suspect), page_count), "little")
              & ~int.from_bytes(bytemap_from_runs(present, page_count), "little"))
    found = bytearray(page_count)
    for start, count in runs_from_bytemap(absent.to_bytes(page_count, "little")):
        end = start + count
        if is_zero(view[start * PAGE_SIZE:end * PAGE_SIZE]):
            continue                 # one check for the whole run
        for page in range(start, end):
            if not is_zero(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]):
                found[page] = 1
    return runs_from_bytemap(found)
