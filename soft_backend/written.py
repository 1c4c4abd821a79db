"""Which pages of guest memory were written, without a write hook: a page this process wrote
is private to it (copied on write from the image, or a fresh anonymous page), which
/proc/self/pagemap shows (present, exclusively mapped, not a file page), or it is an
anonymous page the kernel has swapped out or is moving (compaction): a swap entry, not a file
page, whose exclusive bit the kernel leaves clear meanwhile.

Fresh guest memory uses transparent huge pages, so one write makes 512 pages private: of
those, the pages still all zero are not counted (an absent page reads as zero anyway)."""

from __future__ import annotations

import os

import numpy as np

from vmstate.pages import runs_from_bytemap
from vmstate.state import PAGE_SIZE

PRESENT, SWAPPED, FILE_OR_SHARED, EXCLUSIVE = 1 << 63, 1 << 62, 1 << 61, 1 << 56
WORDS_PER_PAGE = PAGE_SIZE // 8
CHECK_PAGES = 8192                  # zero check in pieces of 32 MiB (bounded temporaries)


def written_pages(view: memoryview, address: int) -> bytes:
    """One byte per page of `view` (guest memory mapped at `address`): 1 where this process
    wrote something other than zeros."""
    pages = len(view) // PAGE_SIZE
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, 8 * pages, 8 * (address // PAGE_SIZE))
    finally:
        os.close(fd)
    private = private_pages(np.frombuffer(data, dtype="<u8"))
    drop_zero_pages(view, private)
    return private.astype(np.uint8).tobytes()


def private_pages(entries: np.ndarray) -> np.ndarray:
    """True for each pagemap entry of an anonymous page this process holds alone, present or
    swapped (a page in migration is a swap entry: counting only present pages lost it)."""
    present = (entries & np.uint64(PRESENT | FILE_OR_SHARED | EXCLUSIVE)) == np.uint64(
        PRESENT | EXCLUSIVE)
    swapped = (entries & np.uint64(PRESENT | SWAPPED | FILE_OR_SHARED)) == np.uint64(SWAPPED)
    return present | swapped


def drop_zero_pages(view: memoryview, marked: np.ndarray) -> None:
    """Unmark the marked pages of `view` (one element per page) that are all zero."""
    words = np.frombuffer(view, dtype=np.uint64).reshape(len(marked), WORDS_PER_PAGE)
    for first, count in runs_from_bytemap(marked.astype(np.uint8).tobytes()):
        for start in range(first, first + count, CHECK_PAGES):
            end = min(start + CHECK_PAGES, first + count)
            marked[start:end] = words[start:end].any(axis=1)
