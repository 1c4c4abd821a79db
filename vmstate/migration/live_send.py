"""Live migration, the sending side (protocol 3.0): pre-copy while the guest runs.

Round 0 sends every present page; each later round sends the pages written during the
previous one (the source's dirty set: KVM's log and the VMM's own writes). When the pages left
can be sent within `max_downtime` at the rate the link has shown, or after `max_rounds`, or
when the dirty set stops shrinking (the guest writes faster than the link), the source pauses
the vCPU; the last dirty pages, the final vCPU and VMM state (an image's metadata without
memory), the guest's files and END (with a digest of the final memory, page_digests.py) go,
and the receiver resumes the guest. The number of
rounds is bounded, so the migration always ends; a guest that outruns the link pays with a
longer final stop-and-copy, whose downtime is reported.

Pages are copied out of guest memory (a numpy gather) before they are hashed and sent, so a
frame's check covers exactly the bytes it carries even while the guest writes on."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import xxhash

from ..image.writer import plan_image
from ..state import PAGE_SIZE, VmState
from . import protocol as P
from .page_digests import PageDigests
from .page_copy import gather
from .send import (
    MigrationFailed, _early_reply, acknowledgement, close_files, file_header, guest_files,
    send_file_content)

MAX_ROUNDS = 30
STALL_ROUNDS = 4             # rounds in a row without a smaller dirty set: stop and copy
FIXED_DOWNTIME = 0.015       # seconds the final stop costs besides its pages (as seen here)
RATE_MARGIN = 2              # the last pages go with the vCPU stopped: assume half the rate
FRAME_PAGES = 1024           # pages per frame: small, so the receiver is never a frame behind


@dataclass(frozen=True)
class LiveOptions:
    max_downtime: float = 0.050
    max_rounds: int = MAX_ROUNDS


class LiveSource(Protocol):
    """The running VM as the sender sees it (one memory region at guest physical 0)."""
    view: memoryview
    stopped_at: float                # time.monotonic() when pause() stopped the vCPU

    def start_tracking(self) -> np.ndarray:
        """Start tracking writes; the pages present now (one byte per page)."""
    def take_dirty(self) -> np.ndarray:
        """Pages written since the previous call (one byte per page)."""
    def pause(self) -> VmState:
        """Stop the vCPU; the VM's final state once it has stopped."""


@dataclass
class Round:
    pages: int
    seconds: float


@dataclass
class LiveReport:
    rounds: list[Round] = field(default_factory=list)
    final_pages: int = 0
    converged: bool = True
    downtime_start: float = 0.0
    sent_bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def lines(self, present_bytes: int, downtime: float) -> list[str]:
        lines = []
        for number, r in enumerate(self.rounds):
            rate = r.pages * PAGE_SIZE / r.seconds / 2**20 if r.seconds else 0.0
            lines.append(f"live: round {number}: {r.pages * PAGE_SIZE / 2**20:.1f} MiB in "
                         f"{r.seconds * 1000:.0f} ms ({rate:.0f} MiB/s)")
        live_time = sum(r.seconds for r in self.rounds)       # pages written meanwhile:
        dirty = sum(r.pages for r in self.rounds[1:]) + self.final_pages
        rate = dirty * PAGE_SIZE / live_time / 2**20 if live_time else 0.0
        how = "converged" if self.converged else "did not converge: final stop-and-copy"
        lines.append(f"live: {how}; final {self.final_pages * PAGE_SIZE / 2**20:.1f} MiB, "
                     f"downtime {downtime * 1000:.1f} ms; dirty rate {rate:.0f} MiB/s; "
                     f"{self.sent_bytes / 2**20:.1f} MiB sent for "
                     f"{present_bytes / 2**20:.1f} MiB present "
                     f"({self.sent_bytes / max(present_bytes, 1):.2f}x); total "
                     f"{time.monotonic() - self.started:.2f} s")
        return lines


class PageSender:
    """PAGES frames: page numbers and copies of the pages, hashed together."""

    def __init__(self, sock, view: memoryview, page_count: int):
        self.sock = sock
        self.digests = PageDigests(page_count)
        self.memory = np.frombuffer(view, np.uint8, page_count * PAGE_SIZE).reshape(
            page_count, PAGE_SIZE)
        self.staging = np.empty((FRAME_PAGES, PAGE_SIZE), np.uint8)
        self.frames = self.payload_bytes = 0

    def send(self, pages: np.ndarray) -> None:
        """One round: `pages` (sorted page numbers) in frames (one, empty, if none)."""
        for start in range(0, max(len(pages), 1), FRAME_PAGES):
            chunk = pages[start:start + FRAME_PAGES]
            data = self.staging[:len(chunk)]
            gather(self.memory, chunk, data)
            self.digests.update(chunk, data)
            numbers = chunk.astype("<u8").tobytes()
            hasher = xxhash.xxh3_64(numbers)
            hasher.update(data)
            length = len(numbers) + data.nbytes
            header = P.FRAME.pack(P.FRAME_PAGES, 0, 0, hasher.intdigest(), length)
            P.send_buffers(self.sock, [memoryview(header), memoryview(numbers),
                                       memoryview(data.reshape(-1))])
            self.count(length)

    def sync(self) -> None:
        """Wait until the receiver has placed everything sent so far (a SYNC frame, answered
        by a REPLY), so that what is in flight never adds to the downtime."""
        self.send_frame(P.FRAME_SYNC, b"")
        status, message = P.recv_reply(self.sock)
        if status != P.STATUS_OK:
            raise MigrationFailed(f"the receiver rejected the VM: {message}")

    def send_frame(self, kind: int, payload: bytes) -> None:
        digest = xxhash.xxh3_64_intdigest(payload)
        P.send_buffers(self.sock, [memoryview(P.FRAME.pack(kind, 0, 0, digest, len(payload))),
                                   memoryview(payload)])
        self.count(len(payload))

    def count(self, length: int) -> None:
        self.frames += 1
        self.payload_bytes += length


def migrate_live(sock, source: LiveSource, with_files: bool, root: str, options: LiveOptions,
                 log=sys.stderr) -> str:
    """Send the running VM (and, `with_files`, its open files' contents, beneath `root`, as
    they are at the final stop); returns the receiver's confirmation (the guest then runs
    there). Raises MigrationFailed (the source VM may carry on)."""
    size = len(source.view)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # the last small frames must
    try:                                                          # not wait for delayed ACKs
        _hello(sock, size, with_files)
        pages = PageSender(sock, source.view, size // PAGE_SIZE)
        pages.send_frame(P.FRAME_LAYOUT, P.LAYOUT_REGION.pack(0, size))
        report = LiveReport()
        dirty = _precopy(source, pages, options, report)
        return _stop_and_copy(sock, source, pages, dirty, with_files, root, report, log)
    except OSError as e:
        raise MigrationFailed(_early_reply(sock) or f"connection lost: {e.strerror or e}") \
            from None


def _hello(sock, size: int, with_files: bool) -> None:
    flags = P.FLAG_WITH_FILES if with_files else 0
    sock.sendall(P.HELLO.pack(P.MAGIC, *P.LIVE_VERSION, *P.LIVE_VERSION, flags, size, 0))
    status, message = P.recv_reply(sock)
    if status != P.STATUS_OK:
        raise MigrationFailed(f"the receiver refused the VM: {message}")


def _precopy(source: LiveSource, pages: PageSender, options: LiveOptions,
             report: LiveReport) -> np.ndarray:
    """Rounds while the guest runs; returns the dirty pages not sent yet (a byte map)."""
    dirty = source.start_tracking()
    smallest, stalled = None, 0
    while True:
        numbers = np.flatnonzero(dirty)
        started = time.monotonic()
        pages.send(numbers)
        pages.sync()
        seconds = time.monotonic() - started
        report.rounds.append(Round(len(numbers), seconds))
        dirty = source.take_dirty()
        left = int(np.count_nonzero(dirty))
        rate = _rate(report)
        if RATE_MARGIN * left * PAGE_SIZE / rate + FIXED_DOWNTIME <= options.max_downtime:
            return dirty
        stalled = stalled + 1 if smallest is not None and left >= smallest else 0
        smallest = left if smallest is None else min(smallest, left)
        if len(report.rounds) >= options.max_rounds or stalled >= STALL_ROUNDS:
            report.converged = False
            return dirty


def _rate(report: LiveReport) -> float:
    """Bytes per second sent and placed by the receiver (the rounds so far, whole)."""
    pages = sum(r.pages for r in report.rounds)
    seconds = sum(r.seconds for r in report.rounds)
    return max(pages * PAGE_SIZE / seconds, 1.0) if seconds > 0.001 else 1e9


def _stop_and_copy(sock, source: LiveSource, pages: PageSender, dirty: np.ndarray,
                   with_files: bool, root: str, report: LiveReport, log) -> str:
    state = source.pause()
    report.downtime_start = source.stopped_at
    final = np.flatnonzero(dirty | source.take_dirty())
    report.final_pages = len(final)
    pages.send(final)
    pages.send_frame(P.FRAME_STATE, plan_image(replace(state, memory=()), []).metadata)
    files = guest_files(state, root) if with_files else []
    try:
        for f in files:
            header, size, digest = file_header(f)      # the frame's check: the content's hash
            sock.sendall(P.FRAME.pack(P.FRAME_FILE, 0, 0, digest, len(header) + size) + header)
            send_file_content(sock, f, size)
            pages.count(len(header) + size)
    finally:
        close_files(files)
    pages.send_frame(P.FRAME_END, P.LIVE_END.pack(pages.frames, pages.payload_bytes,
                                                  pages.digests.digest()))
    report.sent_bytes = pages.payload_bytes
    message = acknowledgement(sock)
    downtime = time.monotonic() - report.downtime_start
    present = int(np.count_nonzero(pages.digests.present)) * PAGE_SIZE
    for line in report.lines(present, downtime):
        print(line, file=log, flush=True)
    return message
