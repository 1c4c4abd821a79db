"""Closing memory mappings that views may still point into, and reading file regions
through a mapping or pread."""

import mmap
import os

from .state import PAGE_SIZE


def close_mapping(mapping: mmap.mmap) -> None:
    """Unmap now if no buffer exports it; otherwise Python unmaps it when the last view or
    ctypes object over it goes away (closing would fail with BufferError)."""
    try:
        mapping.close()
    except BufferError:
        pass


PREFETCH_MIN_PAGES = 256      # shorter runs are left to the kernel's fault-around


def prefetch_runs(mapping: mmap.mmap, offset: int, runs) -> None:
    """Ask the kernel to read the long runs of present pages (first_page, page_count) of a
    file mapping ahead, from file offset `offset`: reading uncached pages through page faults
    alone is three times slower here. Short runs get no call of their own (one system call
    per scattered page would cost more than it saves), nor do the holes between them (the
    kernel would fill its page cache with zeros)."""
    for first, count in runs:
        if count >= PREFETCH_MIN_PAGES:
            mapping.madvise(mmap.MADV_WILLNEED, offset + first * PAGE_SIZE, count * PAGE_SIZE)


class FilePages:
    """The bytes of a file from `offset`, sliced like the memoryview `mapped` of them (a
    mapping of the same bytes). A slice shorter than PREFETCH_MIN_PAGES pages is read with
    pread into one buffer that the next slice reuses: a scattered page read through a
    mapping costs a page fault, and its page-table entry a teardown when the process exits
    (1 GiB, every 4th page: 2 x 61k faults, half the memory check's time). Longer slices are
    views of the mapping (fault-around and prefetch_runs make those cheap). A short read (the
    file shrank) gives a shorter slice."""

    def __init__(self, fd: int, offset: int, mapped: memoryview):
        self._fd, self._offset, self._mapped = fd, offset, mapped
        self._buffer = memoryview(bytearray(PREFETCH_MIN_PAGES * PAGE_SIZE))

    def __len__(self) -> int:
        return len(self._mapped)

    def __getitem__(self, span: slice) -> memoryview:
        start, stop, _ = span.indices(len(self._mapped))
        if stop - start >= len(self._buffer):
            return self._mapped[start:stop]
        piece = self._buffer[:max(stop - start, 0)]
        return piece[:os.preadv(self._fd, [piece], self._offset + start)]
