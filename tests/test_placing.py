"""The receiver's placing worker (vmstate/migration/placing.py): parts are placed and hashed
in the order added, to the image's own checksums; a part's staging slot is not handed out
again while the part may still be waiting; an error in the worker reaches the reading
thread and stops the placing of later parts."""

import threading

import numpy as np
import pytest

from test_present_stream import _layout, plan_hashes
from vmstate.migration.page_copy import scatter
from vmstate.migration.placing import PART_PAGES, STAGING_SLOTS, Placing, Staging
from vmstate.migration.present_stream import PresentStream, StreamChunkHashes, first_difference
from vmstate.state import PAGE_SIZE

from strategies import LAYOUTS


def _stream_bytes(state, views) -> tuple[np.ndarray, bytes]:
    present = PresentStream(state.memory).regions[0]
    pages = np.frombuffer(views[0], np.uint8).reshape(-1, PAGE_SIZE)
    return present, pages[present].tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_staged_parts_are_placed_and_hashed_in_order(layout):
    state, views, plan = _layout(layout)
    present, data = _stream_bytes(state, views)
    memory = np.zeros((state.memory[0].size // PAGE_SIZE, PAGE_SIZE), np.uint8)
    stream = PresentStream(state.memory)
    placing, staging = Placing(StreamChunkHashes(stream, state.memory)), Staging()
    for start in range(0, len(present), PART_PAGES):
        part = present[start:start + PART_PAGES]
        staged = staging.next(len(part) * PAGE_SIZE)
        staged[:] = data[start * PAGE_SIZE:(start + len(part)) * PAGE_SIZE]
        placing.add([staged], lambda part=part, staged=staged: scatter(
            memory, part, np.frombuffer(staged, np.uint8).reshape(-1, PAGE_SIZE)))
    placing.wait()
    staging.close()
    assert memory.tobytes() == bytes(views[0])
    assert first_difference(placing.hashes.hashes, plan_hashes(plan)) is None


def test_a_slot_is_not_reused_while_its_part_may_wait():
    state, views, _ = _layout("every 4th page")
    placing = Placing(StreamChunkHashes(PresentStream(state.memory), state.memory))
    release, data = threading.Event(), bytes(views[0])[:PAGE_SIZE]
    placing.add([data], release.wait)               # the worker holds the first part
    for _ in range(STAGING_SLOTS - 2):
        placing.add([data], None)                   # these wait behind it
    blocked = threading.Thread(target=placing.add, args=([data], None))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()                       # the first part's slot is still in use
    release.set()
    blocked.join()
    placing.wait()


def test_an_error_in_the_worker_reaches_the_reader_and_stops_later_parts():
    state, views, _ = _layout("every 4th page")
    placing = Placing(StreamChunkHashes(PresentStream(state.memory), state.memory))
    placed = []

    def fail():
        raise OSError(28, "No space left on device")
    placing.add([b""], fail)
    with pytest.raises(OSError, match="No space"):
        for part in range(10 * STAGING_SLOTS):
            placing.add([b""], lambda part=part: placed.append(part))
    with pytest.raises(OSError, match="No space"):
        placing.wait()
    assert placed == []
