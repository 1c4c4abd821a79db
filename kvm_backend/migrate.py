"""Migration from the VMM's side: stream a stopped VM to a receiver (with a local image as
the fallback, so the state is never lost), and receive a VM straight into new guest memory
and run it."""

from __future__ import annotations

import os
import socket
import sys
from functools import partial

import numpy as np

from vmstate.errors import RestoreError, VmstateError, describe_error
from vmstate.image.reader import ImageMetadata
from vmstate.image.writer import write_image
from vmstate.migration import protocol as P
from vmstate.migration.page_copy import runs, scatter
from vmstate.migration.placing import PART_PAGES, Placing, Staging
from vmstate.migration.receive import (
    Connection, Received, commit_files, discard_files, receive_vm)
from vmstate.migration.send import MigrationFailed, send_to
from vmstate.rootfs import open_root
from vmstate.state import PAGE_SIZE, VmState

from machine import layout
from machine.base import Machine, check_restorable
from machine.memory import GuestMemory
from machine.outcome import Outcome, SaveHandler

SCATTER_MAX_RUNS = 64        # runs in a memory frame read in place; more are staged


def migrate_to(address: tuple[str, int], connect_timeout: float, with_files: bool, root: str,
               fallback_image: str) -> SaveHandler:
    """A save handler that streams the VM; if that fails, it writes `fallback_image` and
    says so in the error, so the VM's state survives."""
    def save(state: VmState, region_views: list[memoryview]) -> str:
        try:
            message = send_to(address, connect_timeout, state, region_views, with_files, root)
            return f"migrated to {address[0]}:{address[1]}: {message}"
        except (Exception, KeyboardInterrupt) as e:     # whatever happened, keep the VM
            reason = describe_error(e)
        try:
            write_image(fallback_image, state, region_views)
        except VmstateError as e:
            raise MigrationFailed(f"migration failed ({reason}), and so did writing the VM to "
                                  f"{fallback_image}: {e}; the VM is lost") from None
        raise MigrationFailed(f"migration failed ({reason}); the VM was saved to "
                              f"{fallback_image} instead")
    return save


class GuestMemorySink:
    """Receives guest memory straight into the memory of the VM about to run it."""

    def __init__(self):
        self.memory: GuestMemory | None = None
        self._staging = Staging()
        self.metadata: ImageMetadata | None = None

    def prepare(self, metadata: ImageMetadata) -> None:
        check_restorable(metadata.state)         # refuse what this VMM cannot run, early
        self.metadata = metadata
        self.memory = GuestMemory(metadata.state.memory[0].size, huge_pages=False)

    # a live migration (live_receive.LiveMemorySink): memory first, the state last

    def prepare_layout(self, regions: list[tuple[int, int]]) -> None:
        if len(regions) != 1 or regions[0][0] != 0 or regions[0][1] % layout.LARGE_PAGE \
                or not layout.USER_START < regions[0][1] <= layout.MAX_MEMORY:
            raise RestoreError(f"memory layout {regions} does not fit this VMM's (one region "
                               "at guest physical 0, whole 2 MiB pages)")
        self.memory = GuestMemory(regions[0][1])

    @property
    def view(self) -> memoryview:
        return self.memory.view

    def check(self, metadata: ImageMetadata) -> None:
        check_restorable(metadata.state)
        if metadata.state.memory[0].size != self.memory.size:
            raise RestoreError("the final state's memory is not the size announced")
        self.metadata = metadata

    def receive(self, sock: socket.socket, pieces: list[tuple[int, np.ndarray]],
                placing: Placing) -> None:
        """A frame of a few runs is read straight into their places in guest memory; one of
        many short runs a part at a time into staging buffers, each then scattered by numpy
        in the worker (a scattered read of a thousand 4 KiB buffers per call costs more than
        the copy). This thread first faults the part's pages in, by writing a byte of each
        (they are fresh and disjoint from every other part's): a fault per scattered page is
        most of the cost, and this thread would otherwise wait on the worker (157 of 200 ms
        for a 1 GiB guest with a random quarter of its pages)."""
        (_, numbers), = pieces                   # check_restorable: one region
        view = self.memory.view
        if np.count_nonzero(np.diff(numbers) != 1) < SCATTER_MAX_RUNS:
            places = [view[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
                      for _, first, count in runs(numbers)]
            P.recv_into_buffers(sock, list(places), "guest memory")
            placing.add(places, None)
            return
        pages = np.frombuffer(view, np.uint8).reshape(-1, PAGE_SIZE)
        for start in range(0, len(numbers), PART_PAGES):
            part = numbers[start:start + PART_PAGES]
            staged = self._staging.next(len(part) * PAGE_SIZE)
            P.recv_exact_into(sock, staged, "guest memory")
            pages[part, 0] = 0
            placing.add([staged], partial(
                scatter, pages, part, np.frombuffer(staged, np.uint8).reshape(-1, PAGE_SIZE)))

    def discard(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.release_staging()

    def release_staging(self) -> None:
        self._staging.close()


def receive_and_run(connection: Connection, backend, root: str, max_size: int,
                    save: SaveHandler, trace=None, log=sys.stderr) -> Outcome:
    """Receive one VM, verify it, start it, acknowledge, and run it to its end."""
    root_fd = open_root(root)
    sink = GuestMemorySink()
    try:
        received = receive_vm(connection.sock, sink, root_fd, max_size, live=True)
    finally:
        os.close(root_fd)
    print(f"Received {received.total_bytes} bytes", file=log, flush=True)
    with _start(received, sink, backend, root) as vm:
        connection.acknowledge("VM verified and started")
        return vm.run(trace=trace, save=save)


def _start(received: Received, sink: GuestMemorySink, backend, root: str) -> Machine:
    """`backend`: session.KvmBackend or soft_backend's SoftBackend."""
    try:
        commit_files(received)
    except BaseException:
        discard_files(received)
        sink.discard()
        raise
    sink.release_staging()
    memory, sink.memory = sink.memory, None          # the VM owns it from here
    return backend.restore(received.metadata.state, memory, root)

