"""The receiver's view of a cold migration's memory (vmstate/migration/present_stream.py):
which pages each frame fills, and the chunk checksums checked as the frames arrive, whatever
the frame sizes (chunks split across frames) and the layout."""

import random

import numpy as np
import pytest

from strategies import LAYOUTS, layout_state, memory_views
from vmstate.errors import ImageError
from vmstate.image.reader import ImageMetadata
from vmstate.image.writer import plan_image
from vmstate.migration.present_stream import ChunkCheck, PresentStream
from vmstate.migration.send import memory_frames
from vmstate.pages import page_numbers
from vmstate.state import PAGE_SIZE


def _stream(layout: str, pages: int = 4096):
    state, contents = layout_state(layout, pages)
    plan = plan_image(state, memory_views(contents))
    metadata = ImageMetadata("stream", lambda o, n: plan.metadata[o:o + n], None)
    data = b"".join(bytes(b) for _, buffers, _ in memory_frames(plan.regions)
                    for b in buffers)
    return metadata, contents[0], data


def _frame_lengths(total: int, seed: int) -> list[int]:
    """Random whole-page frame lengths that add up to `total`."""
    rng, lengths = random.Random(seed), []
    while total:
        n = min(total, rng.randrange(1, 700) * PAGE_SIZE)
        lengths.append(n)
        total -= n
    return lengths


def _feed(metadata, data, lengths, pieces_per_frame=3):
    stream = PresentStream(metadata)
    check = ChunkCheck(metadata, stream)
    filled = []
    for length in lengths:
        at = stream.position
        (_, numbers), = stream.take(length)
        filled.append(numbers)
        frame = memoryview(data)[at:at + length]
        cuts = sorted({0, length, *(PAGE_SIZE * random.Random(at).randrange(length // PAGE_SIZE + 1)
                                    for _ in range(pieces_per_frame - 1))})
        check.feed([frame[a:b] for a, b in zip(cuts, cuts[1:])])
    check.finish()
    return np.concatenate(filled)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frames_of_any_size_fill_the_present_pages_and_pass(layout):
    metadata, contents, data = _stream(layout)
    filled = _feed(metadata, data, _frame_lengths(len(data), 1))
    assert filled.tolist() == page_numbers(metadata.state.memory[0].present).tolist()
    placed = np.frombuffer(contents, np.uint8).reshape(-1, PAGE_SIZE)[filled]
    assert placed.tobytes() == data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_changed_byte_is_refused_with_its_chunk(layout):
    metadata, _, data = _stream(layout)
    position = random.Random(layout).randrange(len(data))
    page = int(page_numbers(metadata.state.memory[0].present)[position // PAGE_SIZE])
    damaged = bytearray(data)
    damaged[position] ^= 0x40
    with pytest.raises(ImageError, match=f"guest memory {page // 256 * (1 << 20):#x} fails its "
                                         "checksum: corrupted in transit"):
        _feed(metadata, bytes(damaged), _frame_lengths(len(data), 2))


def test_a_stream_that_stops_early_is_not_complete():
    metadata, _, data = _stream("every 4th page")
    stream = PresentStream(metadata)
    check = ChunkCheck(metadata, stream)
    stream.take(len(data) - PAGE_SIZE)
    check.feed([data[:-PAGE_SIZE]])
    with pytest.raises(ImageError, match="ended before its last chunk"):
        check.finish()
