"""Guest memory checksums by fixed-size chunks of guest-physical space.

A region's pages are grouped into chunks of CHUNK_PAGES pages (the last one may be shorter).
A chunk's checksum is XXH3-64 of the bytes of its present pages, concatenated in page order;
absent pages add nothing, and a chunk without present pages hashes the empty string. So the
number of checksums follows the region's size, not how scattered its pages are; computing
them from memory costs one hash call per run of present pages, from a file one pread per
run (file_chunk_checksums).
schemas/image-format.md (section 7) is the normative description."""

from __future__ import annotations

import os
from array import array
from collections import deque
from itertools import chain, compress, repeat
from operator import add, mul, ne, rshift

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
    pages as sorted (first_page, page_count) runs), as an array of u64."""
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


def file_chunk_checksums(fd: int, offset: int, view, runs, page_count: int) -> array:
    """chunk_checksums of a region stored in file `fd` from `offset` (`view` maps those
    bytes). A chunk whose present pages are one run is hashed from `view`; the runs of any
    other chunk are read with one pread each and hashed as they come, both loops running in
    C (map), so the Python work is per chunk, not per run, and a scattered page costs one
    system call and no page fault (a fault costs more here, and its page-table entry a
    teardown at exit). A file that shrank after it was mapped gives short reads in the
    scattered chunks (they fail) but SIGBUS in a one-run chunk read through `view`, as any
    read of a mapping past the end of its file does."""
    hashes = array("Q", [EMPTY]) * chunk_count(page_count)
    if not runs:
        return hashes
    flat = array("q", chain.from_iterable(_split_at_chunks(runs)))
    firsts, counts = flat[0::2], flat[1::2]
    offsets = list(map(add, repeat(offset), map(mul, firsts, repeat(PAGE_SIZE))))
    lengths = list(map(mul, counts, repeat(PAGE_SIZE)))
    chunk_of = array("q", map(rshift, firsts, repeat(CHUNK_SHIFT)))
    bounds = [0, *compress(range(1, len(chunk_of)), map(ne, chunk_of[1:], chunk_of[:-1])),
              len(chunk_of)]
    for low, high in zip(bounds, bounds[1:]):
        if high - low == 1:
            start = offsets[low] - offset
            hashes[chunk_of[low]] = xxhash.xxh3_64_intdigest(view[start:start + lengths[low]])
            continue
        hasher = xxhash.xxh3_64()
        deque(map(hasher.update, map(os.pread, repeat(fd, high - low), lengths[low:high],
                                     offsets[low:high])), maxlen=0)
        hashes[chunk_of[low]] = hasher.intdigest()
    return hashes


def _split_at_chunks(runs):
    """The runs, those that cross a chunk boundary cut there (Python work only for those)."""
    flat = array("q", chain.from_iterable(runs))
    firsts, counts = flat[0::2], flat[1::2]
    lasts = map(rshift, map(add, firsts, map(add, counts, repeat(-1))), repeat(CHUNK_SHIFT))
    crossing = list(compress(range(len(firsts)),
                             map(ne, map(rshift, firsts, repeat(CHUNK_SHIFT)), lasts)))
    if not crossing:
        return runs
    pieces, done = [], 0
    for index in crossing:
        pieces.extend(runs[done:index])
        first, end = runs[index][0], runs[index][0] + runs[index][1]
        while first < end:
            stop = min(end, ((first >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT)
            pieces.append((first, stop - first))
            first = stop
        done = index + 1
    pieces.extend(runs[done:])
    return pieces


def first_bad_chunk(actual: array, expected: array,
                    chunks: range | None = None) -> int | None:
    """The index of the first chunk (of `chunks`, all by default) whose checksum in `actual`
    differs from `expected`; None if none."""
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
