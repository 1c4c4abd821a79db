"""Live migration, the receiving side (protocol 3.0): pages land in the new VM's memory as
they come, a page may come many times (the last copy wins), and the VM is kept only if the
digest of the memory that landed (page_digests.py, read back from where it landed) is the
sender's digest of its final memory. The stream is hostile: every frame is checked against its
own XXH3-64 before it touches guest memory, page numbers against the announced layout, and
the total against a bound on resends."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Protocol

import numpy as np
import xxhash

from ..image.reader import ImageMetadata
from ..pages import PageSet
from ..state import PAGE_SIZE, MemoryRegion
from . import protocol as P
from .page_copy import few_runs, runs, scatter
from .page_digests import PageDigests
from .receive import MAX_METADATA, Received, _receive_file

MAX_RESEND = 32              # PAGES bytes are bounded by this many times the guest's memory
PAGE_ENTRY = P.PAGE_NUMBER.size + PAGE_SIZE


class LiveMemorySink(Protocol):
    """Guest memory that pages land in before the VM exists."""
    view: memoryview

    def prepare_layout(self, regions: list[tuple[int, int]]) -> None:
        """Allocate memory for (guest physical address, size) regions, or refuse them."""
    def check(self, metadata: ImageMetadata) -> None:
        """Refuse a final state this VMM cannot run over the memory prepared (its memory
        region is the layout's, with the pages received present)."""
    def discard(self) -> None: ...


class FrameReader:
    """Protocol 3.0 frame headers and payloads, each payload checked against the header's
    XXH3-64; counts frames and payload bytes for the END frame."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.frames = self.payload_bytes = 0

    def header(self) -> tuple[int, int, int]:
        kind, flags, reserved, check, length = P.FRAME.unpack(
            P.recv_exact(self.sock, P.FRAME.size, "a frame header"))
        if flags or reserved:
            raise P.ProtocolError(f"frame of type {kind} with non-zero flags or reserved field")
        return kind, check, length

    def payload(self, kind: int, check: int, length: int, limit: int) -> bytes:
        if length > limit:
            raise P.ProtocolError(f"frame of type {kind} with {length} bytes (at most {limit})")
        data = P.recv_exact(self.sock, length, f"a frame of type {kind}")
        self.verify(kind, check, xxhash.xxh3_64_intdigest(data))
        self.counted(length)
        return data

    @staticmethod
    def verify(kind: int, check: int, actual: int) -> None:
        if actual != check:
            raise P.ProtocolError(f"frame of type {kind} fails its check: corrupted in transit")

    def counted(self, length: int) -> None:
        self.frames += 1
        self.payload_bytes += length


def receive_live(sock: socket.socket, sink: LiveMemorySink, root_fd: int, memory_size: int,
                 with_files: bool, max_size: int) -> Received:
    """LAYOUT, rounds of PAGES, STATE, FILEs, END; raises VmstateError naming what was wrong.
    The caller discards the sink (and files) on failure."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # SYNC answers go at once
    frames = FrameReader(sock)
    kind, check, length = frames.header()
    if kind != P.FRAME_LAYOUT:
        raise P.ProtocolError(f"the first frame must be the memory layout (got type {kind})")
    layout = frames.payload(kind, check, length, 64 * P.LAYOUT_REGION.size)
    regions = [P.LAYOUT_REGION.unpack_from(layout, at)
               for at in range(0, len(layout) - len(layout) % P.LAYOUT_REGION.size,
                               P.LAYOUT_REGION.size)]
    if not regions or len(layout) % P.LAYOUT_REGION.size \
            or sum(size for _, size in regions) != memory_size:
        raise P.ProtocolError(f"a layout of {len(layout)} bytes that does not describe the "
                              f"{memory_size} bytes of memory announced")
    sink.prepare_layout(regions)
    pages = LivePages(sock, sink.view, frames, regions[0][0])
    received = None
    while True:
        kind, check, length = frames.header()
        if kind == P.FRAME_PAGES and received is None:
            pages.receive(check, length)
        elif kind == P.FRAME_SYNC and received is None:
            frames.payload(kind, check, length, 0)
            P.send_reply(sock, P.STATUS_OK, "synced")
        elif kind == P.FRAME_STATE and received is None:
            metadata = ImageMetadata("the final state", _reader(
                frames.payload(kind, check, length, MAX_METADATA)), None)
            if metadata.state.memory:
                raise P.ProtocolError("the final state describes memory (it came as pages)")
            metadata.state = replace(metadata.state, memory=(pages.region(),))
            sink.check(metadata)
            received = Received(metadata, sink, image_bytes=frames.payload_bytes)
        elif kind == P.FRAME_FILE and received is not None and with_files:
            if memory_size + received.file_bytes + length > max_size:
                raise P.ProtocolError(f"the VM and its files exceed --max-size ({max_size})")
            frames.verify(kind, check, _receive_file(sock, received, root_fd, length))
            frames.counted(length)
            received.file_bytes += length
        elif kind == P.FRAME_END and received is not None:
            done, sent, digest = P.LIVE_END.unpack(
                frames.payload(kind, check, length, P.LIVE_END.size))
            if (done, sent) != (frames.frames - 1, frames.payload_bytes - P.LIVE_END.size):
                raise P.ProtocolError(f"the end frame counts {done} frames and {sent} bytes; "
                                      f"{frames.frames - 1} and "
                                      f"{frames.payload_bytes - P.LIVE_END.size} came")
            if digest != pages.digests.digest():
                raise P.ProtocolError("guest memory differs from the sender's final memory "
                                      "(page digests)")
            return received
        else:
            raise P.ProtocolError(f"unexpected frame of type {kind} ({length} bytes) here")


def _reader(data: bytes):
    return lambda offset, length: data[offset:offset + length]


class LivePages:
    """PAGES frames into guest memory: page numbers checked, the pages received into a
    staging buffer and checked with the numbers against the frame's hash, then scattered to
    their places, where their digests are taken."""

    def __init__(self, sock: socket.socket, view: memoryview, frames: FrameReader,
                 guest_phys_addr: int):
        self.sock, self.frames, self.guest_phys_addr = sock, frames, guest_phys_addr
        page_count = len(view) // PAGE_SIZE
        self.memory = np.frombuffer(view, np.uint8, page_count * PAGE_SIZE).reshape(
            page_count, PAGE_SIZE)
        self.digests = PageDigests(page_count)
        self.staging = np.empty((P.MAX_PAGES_FRAME, PAGE_SIZE), np.uint8)
        self.limit = MAX_RESEND * len(view)
        self.received = 0

    def receive(self, check: int, length: int) -> None:
        count, extra = divmod(length, PAGE_ENTRY)
        if extra or count > P.MAX_PAGES_FRAME:
            raise P.ProtocolError(f"a pages frame of {length} bytes is not whole entries of "
                                  f"{PAGE_ENTRY} bytes (at most {P.MAX_PAGES_FRAME})")
        self.received += length
        if self.received > self.limit:
            raise P.ProtocolError(f"more than {MAX_RESEND} times the guest's memory in pages: "
                                  "the sender never stops")
        raw = P.recv_exact(self.sock, count * P.PAGE_NUMBER.size, "page numbers")
        numbers = np.frombuffer(raw, "<u8")
        if count and (numbers[-1] >= len(self.memory) or np.any(numbers[1:] <= numbers[:-1])):
            raise P.ProtocolError("page numbers outside guest memory or not ascending")
        data = self.staging[:count]
        P.recv_exact_into(self.sock, memoryview(data.reshape(-1)), "guest pages")
        hasher = xxhash.xxh3_64(raw)
        hasher.update(data)
        self.frames.verify(P.FRAME_PAGES, check, hasher.intdigest())
        self.frames.counted(length)
        index = numbers.astype(np.intp)
        scatter(self.memory, index, data)
        self._take_digests(index)

    def _take_digests(self, index: np.ndarray) -> None:
        """Digests of the pages where they landed (so a misplaced page shows)."""
        if not few_runs(index):
            self.digests.update(index, self.memory[index])
            return
        for _, first, count in runs(index) if len(index) else ():
            self.digests.update(np.arange(first, first + count),
                                self.memory[first:first + count])

    def region(self) -> MemoryRegion:
        """The memory received, as the final state's memory region."""
        return MemoryRegion(self.guest_phys_addr, self.memory.nbytes,
                            PageSet.from_bytemap(self.digests.present))
