"""A cold migration's memory stream (vmstate/migration/present_stream.py and the sender's
memory_frames): which pages each frame fills, and the chunk checksums computed from the frames
as they go by, whatever the frame sizes (chunks split across frames) and the layout: the
image's own checksums, so a changed byte shows in its chunk."""

import random
from array import array

import numpy as np
import pytest
from hypothesis import given, settings

from strategies import LAYOUTS, layout_state, memory_views, vm_states
from vmstate.image.writer import plan_image, with_chunk_hashes
from vmstate.migration.present_stream import (
    PresentStream, StreamChunkHashes, chunk_address, first_difference)
from vmstate.migration.send import memory_frames
from vmstate.state import PAGE_SIZE


def _layout(layout: str, pages: int = 4096):
    state, contents = layout_state(layout, pages)
    views = memory_views(contents)
    return state, views, plan_image(state, views)


def plan_hashes(plan):
    """The chunk checksums an image of the plan holds."""
    from vmstate.image.reader import ImageMetadata
    metadata = ImageMetadata("plan", lambda o, n: plan.metadata[o:o + n], None)
    return [data.chunk_hashes for data in metadata.region_data]


def _frame_lengths(total: int, seed: int) -> list[int]:
    """Random whole-page frame lengths that add up to `total`."""
    rng, lengths = random.Random(seed), []
    while total:
        n = min(total, rng.randrange(1, 700) * PAGE_SIZE)
        lengths.append(n)
        total -= n
    return lengths


def _receive(state, data: bytes, lengths: list[int]):
    """What the receiver does with frames of these lengths: (pages filled, checksums)."""
    stream = PresentStream(state.memory)
    hashes = StreamChunkHashes(stream, state.memory)
    filled = []
    for length in lengths:
        at = stream.position
        (_, numbers), = stream.take(length)
        filled.append(numbers)
        frame = memoryview(data)[at:at + length]
        cut = PAGE_SIZE * random.Random(at).randrange(length // PAGE_SIZE + 1)
        hashes.feed([frame[:cut], frame[cut:]])
    assert hashes.complete
    return np.concatenate(filled), hashes.hashes


@pytest.mark.parametrize("frame_pages", [64, 1000])     # 1000: gathered in several pieces
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sent_frames_carry_the_present_pages_and_hash_to_the_image_checksums(layout,
                                                                              frame_pages):
    state, views, plan = _layout(layout)
    stream = PresentStream(state.memory)
    hashes = StreamChunkHashes(stream, state.memory)
    data, position = bytearray(), 0
    for at, length, pieces in memory_frames(stream, views, frame_bytes=frame_pages * PAGE_SIZE):
        assert at == position
        for buffers in pieces:
            hashes.feed(buffers)
            data += b"".join(bytes(b) for b in buffers)
        position += length
        assert len(data) == position
    present = state.memory[0].present.page_numbers()
    pages = np.frombuffer(views[0], np.uint8).reshape(-1, PAGE_SIZE)
    assert bytes(data) == pages[present].tobytes()
    assert hashes.complete and first_difference(hashes.hashes, plan_hashes(plan)) is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frames_of_any_size_fill_the_present_pages_with_the_same_checksums(layout):
    state, views, plan = _layout(layout)
    present = state.memory[0].present.page_numbers()
    data = np.frombuffer(views[0], np.uint8).reshape(-1, PAGE_SIZE)[present].tobytes()
    filled, hashes = _receive(state, data, _frame_lengths(len(data), 1))
    assert filled.tolist() == present.tolist()
    assert first_difference(hashes, plan_hashes(plan)) is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_changed_byte_shows_in_its_chunk(layout):
    state, views, plan = _layout(layout)
    present = state.memory[0].present.page_numbers()
    data = bytearray(np.frombuffer(views[0], np.uint8).reshape(-1, PAGE_SIZE)[present].tobytes())
    position = random.Random(layout).randrange(len(data))
    data[position] ^= 0x40
    _, hashes = _receive(state, bytes(data), _frame_lengths(len(data), 2))
    region, chunk = first_difference(hashes, plan_hashes(plan))
    assert chunk_address(state.memory, region, chunk) == \
        int(present[position // PAGE_SIZE]) // 256 * (1 << 20)


@settings(max_examples=50, deadline=None)
@given(vm_states())
def test_chunk_checksums_put_into_zeroed_metadata_give_the_image_metadata(drawn):
    """What both ends do with the CHUNKS frame: the metadata sent with zero checksums, once
    they are put in, is byte for byte the metadata of the image."""
    state, contents = drawn
    views = memory_views(contents)
    image = plan_image(state, views)
    zeros = [array("Q", bytes(8 * len(h))) for h in plan_hashes(image)]
    sent = plan_image(state, views, zeros).metadata
    assert with_chunk_hashes(sent, plan_hashes(image)) == image.metadata
