"""Guest memory checksums by fixed-size chunks of guest-physical space.

A region's pages are grouped into chunks of CHUNK_PAGES pages (the last one may be shorter).
A chunk's checksum is XXH3-64 of the bytes of its present pages, concatenated in page order;
absent pages add nothing, and a chunk without present pages hashes the empty string. So the
number of checksums follows the region's size, not how scattered its pages are, and
computing them costs one hash call per run of present pages and no system call at all.
schemas/image-format.md (section 7) is the normative description."""

from __future__ import annotations

from array import array

import xxhash

from .state import PAGE_SIZE

CHUNK_SHIFT = 8
CHUNK_PAGES = 1 << CHUNK_SHIFT           # 1 MiB of guest-physical space per checksum
EMPTY = xxhash.xxh3_64_intdigest(b"")
PAGE_SHIFT = 12
assert PAGE_SIZE == 1 << PAGE_SHIFT


def chunk_count(page_count: int) -> int:
    return (page_count + CHUNK_PAGES - 1) >> CHUNK_SHIFT


def chunk_checksums(view, runs, page_count: int) -> array:
    """The checksum of every chunk of a region (`view` holds its bytes, `runs` its present
    pages as sorted (first_page, page_count) runs), as an array of u64. Each slice of `view`
    is hashed before the next is taken, so `view` may hand out one reused buffer (FilePages
    does)."""
    hashes = array("Q", [EMPTY]) * chunk_count(page_count)
    current, hasher, xxh3 = -1, None, xxhash.xxh3_64
    for first, count in runs:
        end = first + count
        while first < end:
            chunk = first >> CHUNK_SHIFT
            stop = min(end, (chunk + 1) << CHUNK_SHIFT)
            piece = view[first << PAGE_SHIFT:stop << PAGE_SHIFT]
            if chunk == current:
                hasher.update(piece)
            else:
                if hasher is not None:
                    hashes[current] = hasher.intdigest()
                current, hasher = chunk, xxh3(piece)
            first = stop
    if hasher is not None:
        hashes[current] = hasher.intdigest()
    return hashes


def first_bad_chunk(view, runs, page_count: int, expected,
                    chunks: range | None = None) -> int | None:
    """The index of the first chunk (of `chunks`, all by default) whose checksum differs from
    `expected`; None if none. `runs` need hold only the present pages of `chunks`."""
    actual = chunk_checksums(view, runs, page_count)
    chunks = range(len(expected)) if chunks is None else chunks
    if actual[chunks.start:chunks.stop] == expected[chunks.start:chunks.stop]:
        return None
    return next(i for i in chunks if actual[i] != expected[i])


def share_of_chunks(page_count: int, share: int, shares: int) -> range:
    """Share `share` of `shares` near-equal shares of a region's chunks."""
    count = chunk_count(page_count)
    return range(count * share // shares, count * (share + 1) // shares)


def chunk_pages(chunk: int, page_count: int) -> tuple[int, int]:
    """(first page, page count) of a chunk."""
    first = chunk << CHUNK_SHIFT
    return first, min(CHUNK_PAGES, page_count - first)
