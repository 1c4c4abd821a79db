"""Sets of guest pages as byte maps (one byte per page, 1 = present) and as runs
(first_page, page_count). Scans use bytes.find and whole-buffer integer operations, so the
Python-level work is per run, never per page."""

from __future__ import annotations

Runs = tuple[tuple[int, int], ...]

# Byte value -> the 8 bytes (0 or 1) of its bits, least significant first (KVM's bit order).
_BITS_TO_BYTES = [bytes((value >> bit) & 1 for bit in range(8)) for value in range(256)]


def bytemap_from_bits(bitmap: bytes, page_count: int) -> bytes:
    """KVM's dirty bitmap (bit i of little-endian u64 words = page i) as a byte map."""
    return b"".join(map(_BITS_TO_BYTES.__getitem__, bitmap))[:page_count]


def bytemap_from_runs(runs: Runs, page_count: int) -> bytearray:
    bytemap = bytearray(page_count)
    for first, count in runs:
        bytemap[first:first + count] = b"\x01" * count
    return bytemap


def union(a, b) -> bytes:
    """Pages present in either byte map (both the same length)."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def runs_from_bytemap(bytemap) -> Runs:
    """Runs of non-zero bytes."""
    data = bytes(bytemap).translate(_NONZERO_TO_ONE)
    runs, position = [], 0
    while (start := data.find(1, position)) >= 0:
        end = data.find(0, start)
        end = len(data) if end < 0 else end
        runs.append((start, end - start))
        position = end
    return tuple(runs)


_NONZERO_TO_ONE = bytes([0] + [1] * 255)


def split_runs(runs: Runs, max_pages: int) -> Runs:
    """Cut runs longer than max_pages into pieces of at most max_pages."""
    out = []
    for first, count in runs:
        for start in range(first, first + count, max_pages):
            out.append((start, min(max_pages, first + count - start)))
    return tuple(out)


def merge_runs(runs: Runs) -> Runs:
    """Join adjacent runs (sorted input): the canonical form of a page set."""
    merged: list[list[int]] = []
    for first, count in runs:
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1][1] += count
        else:
            merged.append([first, count])
    return tuple((first, count) for first, count in merged)


def is_zero(view) -> bool:
    """True if every byte of a buffer is zero (compared in 1 MiB slices, at memcmp speed)."""
    view = memoryview(view).cast("B")
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start:start + len(_ZEROS)]
        if piece != _ZEROS[:len(piece)]:
            return False
    return True


_ZEROS = memoryview(bytes(1 << 20))
