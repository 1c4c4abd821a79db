"""Which pages of guest memory were written, without a write hook: a page this process wrote
is private to it (copied on write from the image, or a fresh anonymous page), which
/proc/self/pagemap shows (present, exclusively mapped, not a file page)."""

from __future__ import annotations

import os

import numpy as np

from vmstate.state import PAGE_SIZE

PRESENT, FILE_OR_SHARED, EXCLUSIVE = 1 << 63, 1 << 61, 1 << 56


def written_pages(address: int, size: int) -> bytes:
    """One byte per page of [address, address+size): 1 where this process wrote."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, 8 * (size // PAGE_SIZE), 8 * (address // PAGE_SIZE))
    finally:
        os.close(fd)
    entries = np.frombuffer(data, dtype="<u8")
    private = (entries & np.uint64(PRESENT | FILE_OR_SHARED | EXCLUSIVE)) == np.uint64(
        PRESENT | EXCLUSIVE)
    return private.astype(np.uint8).tobytes()
