"""The per-page digests split records in the XML (XXH3-64 of each PAGE record's page, in
stream order) and join compares to find the pages that changed; and running them in a thread
beside the writes."""

from __future__ import annotations

import sys
from array import array
from contextlib import contextmanager

import xxhash

from . import layout

BATCH_PAGES = 1024          # pages hashed per call into C: the GIL can change hands between
SWITCH_SECONDS = 0.0005     # GIL switch interval while a digest thread runs beside writes


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


def unpack_digests(data: bytes):
    import numpy as np
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


@contextmanager
def sharing_the_gil():
    """While a digest thread runs beside a thread that writes: a short GIL switch interval.
    The writer gives the GIL up in every pwritev and needs it back for a moment after each;
    with the default 5 ms it would wait that long each time for the hashing thread (which
    never blocks) to hand it over."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_SECONDS))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
