"""The per-page digests split records in the XML (XXH3-64 of each PAGE record's page, in
stream order) and join compares to find the pages that changed. Both take them in a forked
child, beside the process that writes: xxhash holds the GIL for page-sized buffers."""

from __future__ import annotations

from array import array

import xxhash

from . import layout

BATCH_PAGES = 1024          # pages hashed per call into C


def page_digests(buffer, first: int, stride: int, count: int) -> array:
    """XXH3-64 of `count` pages of `buffer` (bytes-like), the first at `first`, the next ones
    `stride` bytes apart, as an array of u64."""
    digests = array("Q")
    size = layout.PAGE_SIZE
    with memoryview(buffer) as view:
        for begin in range(0, count, BATCH_PAGES):
            end = min(count, begin + BATCH_PAGES)
            starts = range(first + begin * stride, first + end * stride, stride)
            digests.extend(map(xxhash.xxh3_64_intdigest,
                               map(view.__getitem__, map(slice, starts,
                                                         range(starts.start + size,
                                                               starts.stop + size, stride)))))
    return digests
