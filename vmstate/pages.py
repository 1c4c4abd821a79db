"""Sets of guest pages as byte maps (one byte per page, 1 = present) and as runs
(first_page, page_count). Scans use bytes.find and whole-buffer integer operations, so the
Python-level work is per run, never per page."""

from __future__ import annotations

Runs = tuple[tuple[int, int], ...]

# For each bit position: byte value -> that bit (0 or 1), for bytes.translate.
_BIT_OF_BYTE = [bytes((value >> bit) & 1 for value in range(256)) for bit in range(8)]


def bytemap_from_bits(bitmap: bytes, page_count: int) -> bytes:
    """KVM's dirty bitmap (bit i of little-endian u64 words = page i) as a byte map: one
    translate and one strided copy per bit position (page 8k + b is bit b of byte k)."""
    bytemap = bytearray(len(bitmap) * 8)
    for bit, table in enumerate(_BIT_OF_BYTE):
        bytemap[bit::8] = bytes(bitmap).translate(table)
    return bytes(bytemap[:page_count])


def bits_from_runs(runs: Runs, page_count: int) -> bytes:
    """The page set as a bitmap (bit i of byte i // 8, least significant first = page i),
    ceil(page_count / 8) bytes: eight strided slices of the byte map, merged as integers."""
    bytemap = bytemap_from_runs(runs, (page_count + 7) // 8 * 8)
    bits = 0
    for bit in range(8):
        bits |= int.from_bytes(bytemap[bit::8], "little") << bit
    return bits.to_bytes(len(bytemap) // 8, "little")


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
