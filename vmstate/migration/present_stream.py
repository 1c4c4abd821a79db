"""The memory of a cold migration (protocol 2.1): the present pages of every region in file
order, one stream of bytes that memory frames carry in consecutive pieces.

`PresentStream.take` says which pages a piece fills, as arrays of page numbers (numpy), so
placing a frame costs the same whatever the number of runs in it. `StreamChunkHashes` computes
the image's chunk checksums (vmstate/chunks.py) from the stream as it goes by, on both ends: a
chunk's present pages are consecutive in the stream, so its checksum is XXH3-64 of one stretch
of the stream, taken from the frames' contiguous buffers while they are in the cache (a few
hash calls per frame, none per run). The sender sends its checksums after the memory (the
CHUNKS frame) and the receiver compares them with its own, so neither end hashes before or
after the transfer."""

from __future__ import annotations

from array import array

import numpy as np
import xxhash

from ..chunks import CHUNK_PAGES, EMPTY, chunk_count
from ..state import PAGE_SIZE, MemoryRegion


class PresentStream:
    """Which pages of which region each next piece of the stream fills."""

    def __init__(self, regions: tuple[MemoryRegion, ...]):
        self.regions = [region.present.page_numbers() for region in regions]
        self.starts = np.cumsum([0] + [len(n) for n in self.regions])   # in pages, per region
        self.total = int(self.starts[-1]) * PAGE_SIZE
        self.position = 0

    def take(self, length: int) -> list[tuple[int, np.ndarray]]:
        """(region, its page numbers) that the next `length` bytes (whole pages) fill."""
        first, end = self.position // PAGE_SIZE, (self.position + length) // PAGE_SIZE
        pieces = []
        for index, numbers in enumerate(self.regions):
            start = int(self.starts[index])
            lo, hi = max(first, start), min(end, start + len(numbers))
            if lo < hi:
                pieces.append((index, numbers[lo - start:hi - start]))
        self.position += length
        return pieces


class StreamChunkHashes:
    """Each region's chunk checksums, computed from the stream's bytes in order."""

    def __init__(self, stream: PresentStream, regions: tuple[MemoryRegion, ...]):
        self.hashes = [array("Q", [EMPTY]) * chunk_count(region.size // PAGE_SIZE)
                       for region in regions]
        ends, where = [], []                  # per chunk with present pages, in stream order
        for index, numbers in enumerate(stream.regions):
            chunks = len(self.hashes[index])
            bounds = np.searchsorted(numbers, np.arange(chunks + 1) * CHUNK_PAGES)
            present = np.flatnonzero(bounds[1:] > bounds[:-1])
            ends += ((bounds[present + 1] + int(stream.starts[index])) * PAGE_SIZE).tolist()
            where += [(index, chunk) for chunk in present.tolist()]
        self.ends, self.where = ends, where
        self.next = 0                         # the chunk the stream is in
        self.position = 0
        self._hasher = None                   # that chunk's bytes so far, if it is split

    def feed(self, pieces) -> None:
        """The next bytes of the stream, as contiguous buffers in stream order."""
        for piece in pieces:
            piece = memoryview(piece).cast("B")
            while len(piece):
                end = self.ends[self.next]
                n = min(len(piece), end - self.position)
                part, piece = piece[:n], piece[n:]
                self.position += n
                if self.position < end:
                    self._hasher = self._hasher or xxhash.xxh3_64()
                    self._hasher.update(part)
                    continue
                if self._hasher is None:
                    digest = xxhash.xxh3_64_intdigest(part)
                else:
                    self._hasher.update(part)
                    digest, self._hasher = self._hasher.intdigest(), None
                region, chunk = self.where[self.next]
                self.hashes[region][chunk] = digest
                self.next += 1

    @property
    def complete(self) -> bool:
        return self.next == len(self.ends)


def first_difference(ours: list[array], theirs: list[array]) -> tuple[int, int] | None:
    """(region, chunk) of the first checksum that differs; None if all agree."""
    for region, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return region, next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return None


def chunk_address(regions: tuple[MemoryRegion, ...], region: int, chunk: int) -> int:
    """The guest physical address where a chunk starts."""
    return regions[region].guest_phys_addr + chunk * CHUNK_PAGES * PAGE_SIZE
