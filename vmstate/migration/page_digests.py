"""Per-page digests of guest memory for live migration's end-to-end check (protocol 3.0,
schemas/migration-protocol.md section 11.5). Both ends keep one u64 per page: the sender of
each page as it sent it (its memory when copied; at the final stop, its final memory), the
receiver of each page as it landed in the new VM's memory. Equal tables at the end mean the
receiver's final memory is the sender's, page for page.

A page's digest is the sum, modulo 2^64, of its 512 little-endian u64 words each multiplied by
an odd constant, WEIGHTS[i] = 0x9E3779B97F4A7C15 * (2i + 1) mod 2^64: one numpy matrix product
over a frame's pages, so its cost follows the bytes that move, never the number of pages or
how they are scattered. Any change confined to one word changes it; it is a checksum against
accidents and bugs, not against an adversary (each frame also carries XXH3-64)."""

from __future__ import annotations

import numpy as np
import xxhash

from ..state import PAGE_SIZE

WORDS = PAGE_SIZE // 8
WEIGHTS = (np.arange(WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)) \
    * np.uint64(0x9E3779B97F4A7C15)


def page_digests(pages: np.ndarray) -> np.ndarray:
    """The digest of each page of a (n, 4096) uint8 array."""
    return pages.view("<u8").reshape(len(pages), WORDS) @ WEIGHTS


class PageDigests:
    def __init__(self, page_count: int):
        self.table = np.zeros(page_count, np.uint64)       # 0 for a page never sent
        self.present = np.zeros(page_count, np.uint8)      # 1 for a page sent at least once

    def update(self, numbers: np.ndarray, pages: np.ndarray) -> None:
        """`pages` (n x 4096 bytes) are now the content of pages `numbers`."""
        self.table[numbers] = page_digests(pages)
        self.present[numbers] = 1

    def digest(self) -> int:
        """XXH3-64 of the whole table (u64 little-endian, in page order)."""
        return xxhash.xxh3_64_intdigest(self.table.astype("<u8").tobytes())
