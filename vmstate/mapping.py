"""Closing memory mappings that views may still point into, and reading file regions ahead
through a mapping."""

import mmap

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
