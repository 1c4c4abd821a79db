"""Sets of guest pages: PageSet (a region's present pages, held as the bitmap images and the
XML store), byte maps (one byte per page, 1 = present) and runs (first_page, page_count).
Scans use bytes.find and whole-buffer integer operations, so the Python-level work is per
run, never per page, and a PageSet makes its runs only when asked for them."""

from __future__ import annotations

import gc
import itertools
import sys
from bisect import bisect_left, bisect_right
from math import inf

Runs = tuple[tuple[int, int], ...]
BITMAP_BLOCK = 1 << 12           # bytes of a bitmap runs_from_bits looks at at once (32 Ki pages)
_EMPTY_BLOCK, _FULL_BLOCK = bytes(BITMAP_BLOCK), b"\xff" * BITMAP_BLOCK

# For each bit position: byte value -> that bit (0 or 1), for bytes.translate.
_BIT_OF_BYTE = [bytes((value >> bit) & 1 for value in range(256)) for bit in range(8)]


def bytemap_from_bits(bitmap: bytes, page_count: int) -> bytes:
    """KVM's dirty bitmap (bit i of little-endian u64 words = page i) as a byte map: one
    translate and one strided copy per bit position (page 8k + b is bit b of byte k)."""
    bytemap = bytearray(len(bitmap) * 8)
    for bit, table in enumerate(_BIT_OF_BYTE):
        bytemap[bit::8] = bytes(bitmap).translate(table)
    return bytes(bytemap[:page_count])


class PageSet:
    """An immutable set of a region's pages, held as a bitmap: bit b of byte k is page 8k + b
    (the image's and the XML's form), `page_count` bits, the padding bits of the last byte
    zero. The runs are decoded when first asked for and kept: reading an image, restoring
    it or counting its pages builds no Python object per run."""

    __slots__ = ("bits", "page_count", "_runs")

    def __init__(self, bits: bytes, page_count: int):
        if len(bits) != (page_count + 7) // 8:
            raise ValueError(f"a bitmap of {len(bits)} bytes for {page_count} pages")
        self.bits, self.page_count, self._runs = bytes(bits), page_count, None

    @classmethod
    def from_runs(cls, runs: Runs, page_count: int) -> PageSet:
        """The pages of sorted, disjoint runs inside [0, page_count)."""
        return cls(bits_from_runs(runs, page_count), page_count)

    @classmethod
    def from_bytemap(cls, bytemap) -> PageSet:
        """The pages whose byte is non-zero."""
        if _numpy_pays():
            import numpy as np
            present = np.frombuffer(bytemap, np.uint8).astype(bool)
            return cls(np.packbits(present, bitorder="little").tobytes(), len(present))
        return cls.from_runs(runs_from_bytemap(bytemap), len(bytemap))

    @property
    def runs(self) -> Runs:
        """The set as sorted, maximal runs."""
        if self._runs is None:
            self._runs = runs_from_bits(self.bits, self.page_count)
        return self._runs

    def runs_in(self, first: int, end: int) -> Runs:
        """The runs of the pages in [first, end) (first a multiple of 8), decoding only that
        part of the bitmap unless the whole set's runs are at hand."""
        end = min(end, self.page_count)
        if self._runs is not None or first % 8:
            return clip_runs(self.runs, first, end)
        if first >= end:
            return ()
        return runs_from_bits(self.bits[first // 8:(end + 7) // 8], end - first, offset=first)

    @property
    def count(self) -> int:
        """How many pages the set holds."""
        return int.from_bytes(self.bits, "little").bit_count()

    def bytemap(self) -> bytes:
        """One byte per page, 1 = present."""
        return bytemap_from_bits(self.bits, self.page_count)

    def page_numbers(self):
        """The pages, in order, as one numpy int64 array."""
        import numpy as np
        bits = np.unpackbits(np.frombuffer(self.bits, np.uint8), bitorder="little")
        return np.flatnonzero(bits[:self.page_count]).astype(np.int64)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PageSet):
            return NotImplemented
        return self.page_count == other.page_count and self.bits == other.bits

    def __hash__(self) -> int:
        return hash((self.page_count, self.bits))

    def __repr__(self) -> str:
        return f"PageSet.from_runs({self.runs!r}, {self.page_count})"


def runs_from_bits(bitmap: bytes, page_count: int, offset: int = 0) -> Runs:
    """The runs of a page bitmap (page 8k + b is bit b of byte k), pages past page_count
    left out, their first pages counted from `offset`. Blocks of BITMAP_BLOCK bytes are
    classed by one comparison each: empty ones are skipped, full ones are runs, and each
    stretch of other blocks goes through the byte map in one piece. So a large sparse or
    fully written bitmap costs next to nothing, and a fragmented one what the byte map
    costs."""
    runs: list[tuple[int, int]] = []
    for kind, start, end in _bitmap_stretches(bitmap):
        if kind == "full":
            pieces = [(offset + start * 8, (end - start) * 8)]
        else:
            pieces = runs_from_bytemap(bytemap_from_bits(bitmap[start:end], (end - start) * 8),
                                       offset=offset + start * 8)
        if runs and pieces and runs[-1][0] + runs[-1][1] == pieces[0][0]:
            runs[-1] = (runs[-1][0], runs[-1][1] + pieces[0][1])
            runs.extend(itertools.islice(pieces, 1, None))
        else:
            runs.extend(pieces)
    end = offset + page_count
    while runs and runs[-1][0] >= end:                   # padding bits of the last byte
        runs.pop()
    if runs:
        runs[-1] = (runs[-1][0], min(runs[-1][1], end - runs[-1][0]))
    return tuple(runs)


def _bitmap_stretches(bitmap: bytes):
    """(kind, first byte, end byte) for the stretches of "full" and "mixed" blocks (a block
    is classed by comparing it with an empty and a full one: memcmp speed)."""
    stretch = None
    for start in range(0, len(bitmap), BITMAP_BLOCK):
        block = bytes(bitmap[start:start + BITMAP_BLOCK])
        kind = None if block == _EMPTY_BLOCK[:len(block)] else \
            "full" if block == _FULL_BLOCK[:len(block)] else "mixed"
        end = start + len(block)
        if stretch is not None and kind == stretch[0]:
            stretch[2] = end
            continue
        if stretch is not None:
            yield tuple(stretch)
        stretch = None if kind is None else [kind, start, end]
    if stretch is not None:
        yield tuple(stretch)


def bits_from_runs(runs: Runs, page_count: int) -> bytes:
    """The page set as a bitmap (bit i of byte i // 8, least significant first = page i),
    ceil(page_count / 8) bytes: eight strided slices of the byte map, merged as integers."""
    bytemap = bytemap_from_runs(runs, (page_count + 7) // 8 * 8)
    bits = 0
    for bit in range(8):
        bits |= int.from_bytes(bytemap[bit::8], "little") << bit
    return bits.to_bytes(len(bytemap) // 8, "little")


def bytemap_from_runs(runs: Runs, page_count: int) -> bytearray:
    """The byte map of runs; more than NUMPY_MIN_RUNS runs are set by numpy in one step (when
    numpy is loaded: see _numpy_pays)."""
    if len(runs) > NUMPY_MIN_RUNS and _numpy_pays():
        import numpy as np
        table = _run_table(runs)
        edges = np.zeros(page_count + 1, np.int32)      # +1 where a run starts, -1 after it
        edges[table[:, 0]] += 1
        edges[table[:, 0] + table[:, 1]] -= 1
        return bytearray(np.cumsum(edges[:-1]).astype(np.uint8).tobytes())
    bytemap = bytearray(page_count)
    for first, count in runs:
        bytemap[first:first + count] = b"\x01" * count
    return bytemap


def union(a, b) -> bytes:
    """Pages present in either byte map (both the same length)."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def runs_from_bytemap(bytemap, offset: int = 0) -> Runs:
    """Runs of non-zero bytes (their first pages counted from `offset`). A large map has its
    run edges found by numpy (a fragmented 1 GiB guest: 65,536 runs, 41 -> 4 ms) when numpy
    is loaded (see _numpy_pays), any other by bytes.find."""
    if len(bytemap) >= NUMPY_MIN_PAGES and _numpy_pays():
        return _runs_by_numpy(bytemap, offset)
    data = bytes(bytemap).translate(_NONZERO_TO_ONE)
    runs, position = [], 0
    while (start := data.find(1, position)) >= 0:
        end = data.find(0, start)
        end = len(data) if end < 0 else end
        runs.append((start + offset, end - start))
        position = end
    return tuple(runs)


_NONZERO_TO_ONE = bytes([0] + [1] * 255)
NUMPY_MIN_PAGES = 1 << 15
NUMPY_MIN_RUNS = 1024


def _numpy_pays() -> bool:
    """Whether numpy is already loaded (save, migration, QEMU streams). Importing it costs
    about 90 ms here, more than the Python loops cost even for 4 GiB of one-page runs, so a
    command that does not otherwise need it (restore, info, split) does not import it."""
    return "numpy" in sys.modules


def _run_table(runs: Runs):
    """Runs as an (n, 2) int64 numpy array."""
    import numpy as np
    return np.fromiter(itertools.chain.from_iterable(runs), np.int64,
                       2 * len(runs)).reshape(-1, 2)


def _runs_by_numpy(bytemap, offset: int) -> Runs:
    import numpy as np
    present = np.frombuffer(bytemap, np.uint8).astype(bool)
    edges = np.flatnonzero(present[1:] != present[:-1]) + 1      # where a run starts or ends
    edges = np.concatenate(([0] if present[0] else [], edges,
                            [len(present)] if present[-1] else [])).astype(np.int64)
    starts, ends = edges[0::2], edges[1::2]
    collecting = gc.isenabled()
    gc.disable()            # tuples of ints make no cycles: no collection for each 700 of them
    try:
        return tuple(zip((starts + offset).tolist(), (ends - starts).tolist()))
    finally:
        if collecting:
            gc.enable()


def merge_runs(runs: Runs) -> Runs:
    """Join adjacent runs (sorted input): the canonical form of a page set."""
    merged: list[list[int]] = []
    for first, count in runs:
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1][1] += count
        else:
            merged.append([first, count])
    return tuple((first, count) for first, count in merged)


def clip_runs(runs: Runs, first: int, end: int) -> Runs:
    """The parts of sorted, disjoint runs that lie in pages [first, end) (found by bisection:
    no Python work for the runs outside)."""
    if first >= end:
        return ()
    start = bisect_right(runs, (first, inf)) - 1         # the last run starting at or before
    if start < 0 or sum(runs[start]) <= first:
        start += 1
    clipped = list(runs[start:bisect_left(runs, (end,))])
    if clipped:
        page, count = clipped[0]
        clipped[0] = (max(page, first), page + count - max(page, first))
        page, count = clipped[-1]
        clipped[-1] = (page, min(page + count, end) - page)
    return tuple(clipped)


def is_zero(view) -> bool:
    """True if every byte of a buffer is zero (compared in 1 MiB slices, at memcmp speed)."""
    view = memoryview(view).cast("B")
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start:start + len(_ZEROS)]
        if piece != _ZEROS[:len(piece)]:
            return False
    return True


_ZEROS = memoryview(bytes(1 << 20))
