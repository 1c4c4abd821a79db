"""The memory of a cold migration (protocol 2.0) as the receiver sees it: the present pages of
every region in file order, one stream of bytes that memory frames carry in consecutive
pieces.

`PresentStream.take` says which pages a piece fills, as arrays of page numbers (numpy), so
placing a frame costs the same whatever the number of runs in it. `ChunkCheck` verifies the
image's chunk checksums (vmstate/chunks.py) as the bytes arrive: a chunk's present pages are
consecutive in the stream, so its checksum is XXH3-64 of one stretch of the stream, taken
from the frames' contiguous buffers (a few hash calls per frame, none per run) while they are
still in the cache, and a corrupted chunk is refused as soon as its last byte has arrived."""

from __future__ import annotations

import numpy as np
import xxhash

from ..chunks import CHUNK_PAGES, EMPTY, chunk_count
from ..errors import ImageError
from ..image.reader import ImageMetadata
from ..pages import page_numbers
from ..state import PAGE_SIZE


class PresentStream:
    """Which pages of which region each next piece of the stream fills."""

    def __init__(self, metadata: ImageMetadata):
        self.regions = [page_numbers(region.present) for region in metadata.state.memory]
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


class ChunkCheck:
    """Each chunk checksum of the image metadata, compared as the stream's bytes arrive."""

    def __init__(self, metadata: ImageMetadata, stream: PresentStream):
        self.metadata = metadata
        ends, expected, where = [], [], []        # per chunk with present pages, in order
        for index, (region, data) in enumerate(zip(metadata.state.memory, metadata.region_data)):
            numbers = stream.regions[index]
            chunks = chunk_count(region.size // PAGE_SIZE)
            hashes = np.frombuffer(data.chunk_hashes, np.uint64)
            bounds = np.searchsorted(numbers, np.arange(chunks + 1) * CHUNK_PAGES)
            present = np.flatnonzero(bounds[1:] > bounds[:-1])
            empty = np.ones(chunks, bool)
            empty[present] = False
            if np.any(hashes[empty] != np.uint64(EMPTY)):
                self._fail(index, int(np.flatnonzero(empty & (hashes != np.uint64(EMPTY)))[0]))
            ends.append((bounds[present + 1] + int(stream.starts[index])) * PAGE_SIZE)
            expected.append(hashes[present])
            where += [(index, int(chunk)) for chunk in present]
        self.ends = np.concatenate(ends).tolist() if ends else []
        self.expected = np.concatenate(expected).tolist() if expected else []
        self.where = where
        self.next = 0                              # the chunk the stream is in
        self.position = 0
        self._hasher = None                        # the next chunk's bytes so far, if split

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
                if digest != self.expected[self.next]:
                    self._fail(*self.where[self.next])
                self.next += 1

    def finish(self) -> None:
        """Every chunk has been checked (the stream is complete)."""
        if self.next != len(self.ends):
            raise ImageError("guest memory ended before its last chunk", "stream")

    def _fail(self, region: int, chunk: int):
        gpa = self.metadata.state.memory[region].guest_phys_addr + \
            chunk * CHUNK_PAGES * PAGE_SIZE
        raise ImageError(f"guest memory {gpa:#x} fails its checksum: corrupted in transit",
                         "stream")
