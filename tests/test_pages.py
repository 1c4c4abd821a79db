"""Page sets: the bitmap the image format stores and the runs the model holds agree, whatever
the bitmap (the fast decoder is checked against the byte-map one)."""

from hypothesis import given, strategies as st

from vmstate.pages import (
    bits_from_runs, bytemap_from_bits, clip_runs, runs_from_bits, runs_from_bytemap)


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


@given(bitmap=_bitmaps(), first=st.integers(0, 500), end=st.integers(0, 500))
def test_clip_runs_keeps_the_pages_in_range(bitmap, first, end):
    pages = len(bitmap) * 8
    bytemap = bytearray(bytemap_from_bits(bitmap, pages))
    expected = runs_from_bytemap(bytemap[first:end], first) if first < end else ()
    assert clip_runs(runs_from_bits(bitmap, pages), first, end) == expected
