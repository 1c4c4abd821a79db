"""The image format's chunk checksums of one memory region (vmstate/chunks.py), kept up to
date while its pages change: pages marked since the last refresh make their chunks stale, and
a refresh hashes only the stale chunks. Both ends of a live migration keep one, the sender over
its guest's memory and the receiver over what arrived; equal checksums at the end mean equal
final memory.

The present set is a numpy byte map (1 = present) and marks are numpy arrays of page numbers,
so the Python-level work is per stale chunk and per run of present pages in it, never per
page."""

from __future__ import annotations

from array import array

import numpy as np
import xxhash

from ..chunks import CHUNK_SHIFT, EMPTY, chunk_count, chunk_pages
from ..state import PAGE_SIZE


class ChunkDigests:
    def __init__(self, view: memoryview, page_count: int):
        self.view, self.page_count = view, page_count
        self.present = np.zeros(page_count, np.uint8)
        self.hashes = array("Q", [EMPTY]) * chunk_count(page_count)
        self._stale = np.zeros(len(self.hashes), np.bool_)

    def mark(self, pages: np.ndarray) -> None:
        """`pages` (page numbers) are present and may have changed."""
        self.present[pages] = 1
        self._stale[pages >> CHUNK_SHIFT] = True

    def refresh(self) -> int:
        """Hash every stale chunk's present pages as they are now; returns how many."""
        stale = np.flatnonzero(self._stale)
        for chunk in stale.tolist():
            first, count = chunk_pages(chunk, self.page_count)
            self.hashes[chunk] = self._digest(first, self.present[first:first + count])
        self._stale[:] = False
        return len(stale)

    def _digest(self, first: int, present: np.ndarray) -> int:
        if present.all():
            return xxhash.xxh3_64_intdigest(
                self.view[first * PAGE_SIZE:(first + len(present)) * PAGE_SIZE])
        edges = np.flatnonzero(np.diff(np.concatenate(([0], present, [0])).astype(np.int8)))
        hasher = xxhash.xxh3_64()
        for start, end in edges.reshape(-1, 2).tolist():
            hasher.update(self.view[(first + start) * PAGE_SIZE:(first + end) * PAGE_SIZE])
        return hasher.intdigest()
