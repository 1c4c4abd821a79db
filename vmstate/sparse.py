"""Finding data in sparse files: which pages outside a present set hold non-zero bytes.

Only the parts of a file that the file system stores (SEEK_DATA/SEEK_HOLE) are read, so a
4 GiB region with a few stored pages costs a few reads, not 4 GiB of zeros."""

from __future__ import annotations

import os

from .pages import Runs, bytemap_from_runs, is_zero, runs_from_bytemap
from .state import PAGE_SIZE

_INVERT = bytes([1] + [0] * 255)     # byte map translation: present <-> absent


def data_segments(fd: int, start: int, end: int):
    """(offset, end) of the parts of [start, end) the file system stores."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:                 # ENXIO: no more data (or no SEEK_DATA: nothing to skip)
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def nonzero_pages_outside(fd: int, file_offset: int, view: memoryview, present: Runs) -> Runs:
    """Runs of pages of `view` (the file's bytes from `file_offset`) that are not in `present`
    but hold non-zero bytes, at page granularity."""
    page_count = len(view) // PAGE_SIZE
    absent = bytemap_from_runs(present, page_count).translate(_INVERT)
    found = bytearray(page_count)
    for start, end in data_segments(fd, file_offset, file_offset + len(view)):
        first = (start - file_offset) // PAGE_SIZE
        last = (end - file_offset + PAGE_SIZE - 1) // PAGE_SIZE
        for run_first, run_count in runs_from_bytemap(absent[first:last]):
            start, end = first + run_first, first + run_first + run_count
            if is_zero(view[start * PAGE_SIZE:end * PAGE_SIZE]):
                continue                 # the usual case: one check for the whole run
            for page in range(start, end):
                if not is_zero(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]):
                    found[page] = 1
    return runs_from_bytemap(found)
