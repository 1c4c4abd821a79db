"""The receiver's pipeline for memory frames: the main thread reads the socket into small
staging buffers (or straight into place), and one worker thread puts each part in its place
and hashes it, in stream order, while the next part is read. The socket read, numpy's scatter
and pwrite release the GIL; xxhash does not, but hashing costs far less than the rest.

A frame is handed over in parts of at most PART_PAGES pages, so the staging buffers are a
few MiB that stay in the cache and are faulted in once, whatever the frame size."""

from __future__ import annotations

import mmap
import queue
import threading
from typing import Callable

from ..mapping import close_mapping
from ..state import PAGE_SIZE
from .present_stream import StreamChunkHashes

PART_PAGES = 256             # pages in one part handed to the worker (1 MiB)
STAGING_SLOTS = 4            # staging buffers: one being read, the others waiting or placed


class Placing:
    """Parts of the stream placed and hashed by one worker thread, in the order added. At
    most STAGING_SLOTS - 1 parts are waiting or being placed, so the staging slot a part was
    read into is free again once the next STAGING_SLOTS - 1 parts have been added."""

    def __init__(self, hashes: StreamChunkHashes):
        self.hashes = hashes
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Semaphore(STAGING_SLOTS - 1)
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None

    def add(self, buffers: list, place: Callable[[], None] | None) -> None:
        """Hash `buffers` (the part's bytes, in stream order), after `place` puts them where
        they belong if the read did not; waits while STAGING_SLOTS - 1 parts are pending."""
        self._room.acquire()
        if self._error is not None:
            self._room.release()
            raise self._error
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, daemon=True, name="place-parts")
            self._worker.start()
        self._jobs.put((buffers, place))

    def wait(self) -> None:
        """Every part added is placed and hashed; raises the worker's error if it had one."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:         # after an error, parts are only let through
                    buffers, place = job
                    if place is not None:
                        place()
                    self.hashes.feed(buffers)
            except BaseException as e:          # raised in the reading thread
                self._error = e
            finally:
                self._room.release()


class Staging:
    """STAGING_SLOTS buffers of PART_PAGES pages, handed out in turn (see Placing)."""

    def __init__(self):
        self._map: mmap.mmap | None = None
        self._turn = 0

    def next(self, length: int) -> memoryview:
        """The next slot, cut to `length` bytes (at most PART_PAGES pages)."""
        slot = PART_PAGES * PAGE_SIZE
        if self._map is None:
            self._map = mmap.mmap(-1, STAGING_SLOTS * slot)
        start = self._turn * slot
        self._turn = (self._turn + 1) % STAGING_SLOTS
        return memoryview(self._map)[start:start + length]

    def close(self) -> None:
        if self._map is not None:
            close_mapping(self._map)
            self._map = None
