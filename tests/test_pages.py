"""Page sets: the bitmap the image format stores and the runs the model holds agree, whatever
the bitmap (the fast decoder is checked against the byte-map one)."""

from unittest.mock import patch

import numpy  # noqa: F401 (loaded, as in the commands that use numpy: its paths are taken)
import pytest
from hypothesis import given, settings, strategies as st

import vmstate.pages

from vmstate.pages import (
    NUMPY_MIN_PAGES, PageSet, bits_from_runs, bytemap_from_bits, bytemap_from_runs, clip_runs,
    runs_from_bits, runs_from_bytemap)


def _bitmaps():
    """Bitmaps of any length with long 0x00/0xff stretches as well as random bytes."""
    piece = st.one_of(st.binary(max_size=12), st.integers(1, 40).map(lambda n: b"\xff" * n),
                      st.integers(1, 40).map(lambda n: b"\x00" * n))
    return st.lists(piece, max_size=12).map(b"".join)


@given(bitmap=_bitmaps(), spare=st.integers(0, 7))
def test_runs_from_bits_matches_the_byte_map(bitmap, spare):
    pages = max(len(bitmap) * 8 - spare, 0)
    expected = runs_from_bytemap(bytemap_from_bits(bitmap, pages))
    assert runs_from_bits(bitmap, pages) == expected
    assert runs_from_bits(bits_from_runs(expected, pages), pages) == expected


def _block_bitmaps():
    """Bitmaps of whole BITMAP_BLOCK blocks, empty, full or with a few bytes set, and a tail:
    what the block classing sees in a large image."""
    from vmstate.pages import BITMAP_BLOCK

    def block(kind: int, spot: int, value: int) -> bytes:
        base = bytearray(b"\xff" * BITMAP_BLOCK if kind == 1 else bytes(BITMAP_BLOCK))
        if kind == 2:
            base[spot % BITMAP_BLOCK] = value
        return bytes(base)
    one = st.builds(block, st.integers(0, 2), st.integers(0, BITMAP_BLOCK - 1),
                    st.integers(1, 254))
    return st.builds(lambda blocks, tail: b"".join(blocks) + tail,
                     st.lists(one, min_size=1, max_size=4), st.binary(max_size=20))


@settings(deadline=None)     # the first large map imports numpy
@given(bitmap=_block_bitmaps(), spare=st.integers(0, 7))
def test_runs_from_bits_over_whole_blocks(bitmap, spare):
    pages = len(bitmap) * 8 - spare
    assert runs_from_bits(bitmap, pages) == runs_from_bytemap(bytemap_from_bits(bitmap, pages))


@given(first=st.sampled_from((0, 1)),
       stretches=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 9000)), max_size=40),
       offset=st.integers(0, 1000))
def test_large_byte_maps_give_the_runs_of_their_non_zero_bytes(first, stretches, offset):
    """Maps of NUMPY_MIN_PAGES and more take the numpy path (numpy is loaded here) and, in a
    command that has not loaded numpy, the Python one: the same runs as a page-by-page scan."""
    bytemap = bytes([first]) * NUMPY_MIN_PAGES + \
        b"".join(bytes([value]) * n for value, n in stretches)
    expected, start = [], None
    for page, value in enumerate(bytemap + b"\0"):
        if value and start is None:
            start = page
        elif not value and start is not None:
            expected.append((start + offset, page - start))
            start = None
    for numpy_loaded in (True, False):
        with patch.object(vmstate.pages, "_numpy_pays", lambda: numpy_loaded):
            assert runs_from_bytemap(bytemap, offset) == tuple(expected)
            assert bytemap_from_runs(tuple(expected), len(bytemap) + offset)[offset:] == \
                bytes(bool(value) for value in bytemap)


def test_page_numbers_of_a_page_set():
    assert PageSet.from_runs(((2, 3), (10, 2)), 13).page_numbers().tolist() == [2, 3, 4, 10, 11]
    assert PageSet.from_runs((), 9).page_numbers().tolist() == []


@given(bitmap=_bitmaps(), spare=st.integers(0, 7), first=st.integers(0, 60),
       end=st.integers(0, 600))
def test_a_page_set_holds_its_bitmap_and_decodes_any_part_of_it(bitmap, spare, first, end):
    """runs, runs_in (from the bitmap, or clipped from runs already decoded), count, bytemap
    and from_bytemap agree with the byte map, with numpy loaded or not."""
    pages = max(len(bitmap) * 8 - spare, 0)
    bitmap = bits_from_runs(runs_from_bits(bitmap, pages), pages)    # padding bits zero
    bytemap = bytemap_from_bits(bitmap, pages)
    pages_set = PageSet(bitmap, pages)
    first *= 8
    expected = runs_from_bytemap(bytemap[first:end], first) if first < min(end, pages) else ()
    assert pages_set.runs_in(first, end) == expected
    assert pages_set.runs == runs_from_bytemap(bytemap)
    assert pages_set.runs_in(first, end) == expected            # runs at hand: clipped
    assert pages_set.count == sum(bytemap)
    assert pages_set.bytemap() == bytemap
    for numpy_loaded in (True, False):
        with patch.object(vmstate.pages, "_numpy_pays", lambda: numpy_loaded):
            assert PageSet.from_bytemap(bytemap) == pages_set
    assert PageSet.from_runs(pages_set.runs, pages) == pages_set


def test_a_bitmap_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="a bitmap of 2 bytes for 20 pages"):
        PageSet(b"\0\0", 20)


@given(bitmap=_bitmaps(), first=st.integers(0, 500), end=st.integers(0, 500))
def test_clip_runs_keeps_the_pages_in_range(bitmap, first, end):
    pages = len(bitmap) * 8
    bytemap = bytearray(bytemap_from_bits(bitmap, pages))
    expected = runs_from_bytemap(bytemap[first:end], first) if first < end else ()
    assert clip_runs(runs_from_bits(bitmap, pages), first, end) == expected


def test_many_runs_round_trip_through_the_byte_map():
    """Over NUMPY_MIN_RUNS runs (numpy paths both ways), the first and last page included."""
    import random
    rng = random.Random(9)
    bytemap = bytes(rng.choice((0, 0, 1, 5)) for _ in range(NUMPY_MIN_PAGES + 999))
    bytemap = b"\1" + bytemap[1:-1] + b"\1"
    runs = runs_from_bytemap(bytemap)
    assert len(runs) > 5000
    assert bytemap_from_runs(runs, len(bytemap)) == bytes(bool(v) for v in bytemap)
    assert PageSet.from_runs(runs, len(bytemap)).page_numbers().tolist() == \
        [i for i, v in enumerate(bytemap) if v]
