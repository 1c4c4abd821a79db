"""Closing memory mappings that views may still point into."""

import mmap


def close_mapping(mapping: mmap.mmap) -> None:
    """Unmap now if no buffer exports it; otherwise Python unmaps it when the last view or
    ctypes object over it goes away (closing would fail with BufferError)."""
    try:
        mapping.close()
    except BufferError:
        pass
