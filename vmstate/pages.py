"""Sets of guest pages as byte maps (one uint8 per page, 1 = present) and as runs
(first_page, page_count), converted with numpy rather than Python loops over pages."""

from __future__ import annotations

import numpy as np

Runs = tuple[tuple[int, int], ...]


def bytemap_from_bits(bitmap: bytes, page_count: int) -> np.ndarray:
    """KVM's dirty bitmap (bit i of little-endian u64 words = page i) as a byte map."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[:page_count].copy()


def bytemap_from_runs(runs: Runs, page_count: int) -> np.ndarray:
    bytemap = np.zeros(page_count, dtype=np.uint8)
    for first, count in runs:
        bytemap[first:first + count] = 1
    return bytemap


def runs_from_bytemap(bytemap) -> Runs:
    present = np.frombuffer(bytemap, dtype=np.uint8) if not isinstance(bytemap, np.ndarray) \
        else bytemap
    edges = np.diff(np.concatenate(([0], (present != 0).astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return tuple(zip(starts.tolist(), (ends - starts).tolist()))


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
