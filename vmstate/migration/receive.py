"""The receiving side: treat the stream as hostile, check every field against the protocol
and every length and offset against the VM's own metadata, verify everything, and only then
keep the VM.

Memory goes from the socket straight to where it will live: the new VM's memory (--run) or
the image file (-o); its chunk checksums are computed as it arrives (present_stream.py) and
compared with the sender's, which follow it.
Guest files carried with --with-files have no name until the whole VM has been verified."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Protocol

import numpy as np
import xxhash

from ..atomic import PendingFile
from ..errors import FormatError, ImageError, describe_error
from ..image import layout as L
from ..image.reader import Image, ImageMetadata, checksum
from ..fd import pwrite_all
from ..image.writer import with_chunk_hashes
from ..rootfs import MODE_BITS, open_directory_beneath, open_root
from ..state import FD_FILE, PAGE_SIZE
from ..validate import is_inside_root
from . import protocol as P
from .page_copy import runs
from .placing import PART_PAGES, Placing, Staging
from .present_stream import PresentStream, StreamChunkHashes, chunk_address, first_difference

HELLO_TIMEOUT = 3.0          # seconds from the connection to a complete hello
START_GRACE = 3.0            # seconds of slack before the stream must keep up with --min-rate
DEFAULT_MIN_RATE = 1 << 20   # bytes per second
BACKLOG = 64
REPLY_TIMEOUT = 5.0          # a reply is small: a peer that does not take it is dropped
DRAIN_TIME = 30              # after our own failure, read (and drop) what the sender still sends
MAX_METADATA = 1 << 28
MAX_PATH = 4096


class PacedSocket:
    """A sender's connection with deadlines: the hello within HELLO_TIMEOUT, and byte N of
    the stream within START_GRACE + N / min_rate seconds of the connection, which bounds the
    whole transfer by its announced size. A late byte is a ProtocolError."""

    def __init__(self, sock: socket.socket, min_rate: int):
        self.sock, self.min_rate = sock, min_rate
        self.start = time.monotonic()
        self.received = 0

    def deadline(self, through: int) -> float:
        """When byte `through` (counted from the hello's first) must have arrived."""
        if through <= P.HELLO.size:
            return self.start + HELLO_TIMEOUT
        return self.start + START_GRACE + through / self.min_rate

    def recv_into(self, view, nbytes: int = 0) -> int:
        return self._paced(self.sock.recv_into, view, nbytes)

    def recvmsg_into(self, buffers) -> tuple:
        """Scattered reads (memory straight into guest pages) count and are paced too."""
        return self._paced(self.sock.recvmsg_into, buffers)

    def _paced(self, receive, *args):
        remaining = self.deadline(self.received + 1) - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            result = receive(*args)
        except TimeoutError:
            raise P.ProtocolError(self._too_slow()) from None
        self.received += result if isinstance(result, int) else result[0]
        return result

    def _too_slow(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.received < P.HELLO.size:
            return f"no complete hello within {HELLO_TIMEOUT:g} s"
        return (f"too slow: {self.received} bytes in {elapsed:.1f} s (--min-rate is "
                f"{self.min_rate} bytes/s after {START_GRACE:g} s)")

    def sendall(self, data) -> None:
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class Refused(P.ProtocolError):
    """Refused at the hello; the refusal has been sent already."""


class MemorySink(Protocol):
    """Where received guest memory goes."""

    def prepare(self, metadata: ImageMetadata) -> None: ...

    def receive(self, sock: socket.socket, pieces: list[tuple[int, np.ndarray]],
                placing: Placing) -> None:
        """Read the next pages of the stream, `pieces` (region index, its page numbers), and
        hand them to `placing` part by part, in stream order: the bytes read, as contiguous
        buffers (their chunk checksums are taken from them), and what puts them in their
        places if the read did not (run in the worker thread while the next part is read).
        Staged parts go through a placing.Staging."""

    def discard(self) -> None: ...


@dataclass
class ReceivedFile:
    path: str
    pending: PendingFile


@dataclass
class Received:
    metadata: ImageMetadata
    sink: MemorySink
    files: list[ReceivedFile] = field(default_factory=list)
    image_bytes: int = 0
    file_bytes: int = 0
    final_metadata: bytes = b""         # the metadata with the sender's chunk checksums

    @property
    def total_bytes(self) -> int:
        return self.image_bytes + self.file_bytes


def receive_vm(sock: socket.socket, sink: MemorySink, root_fd: int, max_size: int,
               live: bool = False) -> Received:
    """One VM from one sender; raises VmstateError naming what was wrong. With `live` (the
    sink can also take memory before the state: live_receive.LiveMemorySink), a live
    migration (protocol 3.0) is accepted too."""
    image_size, with_files, version = _hello(sock, max_size, live)
    received = None
    try:
        if version == P.LIVE_VERSION:
            from .live_receive import receive_live
            received = receive_live(sock, sink, root_fd, image_size, with_files, max_size)
            return received
        received = _receive_metadata(sock, sink, image_size)
        _receive_frames(sock, received, root_fd, with_files, max_size)
        return received
    except BaseException:
        sink.discard()
        if received is not None:
            discard_files(received)
        raise


def _hello(sock: socket.socket, max_size: int, live: bool) -> tuple[int, bool, tuple[int, int]]:
    """Check the hello and accept it: (announced size, files follow, the version chosen)."""
    magic, lo_major, lo_minor, hi_major, hi_minor, flags, image_size, reserved = P.HELLO.unpack(
        P.recv_exact(sock, P.HELLO.size, "the hello"))
    if magic != P.MAGIC:
        _refuse(sock, f"bad magic {magic!r} (expected {P.MAGIC!r}): not a vmstate sender")
    ours = ([P.LIVE_VERSION] if live else []) + [(P.VERSION_MAJOR, P.VERSION_MINOR)]
    version = next((v for v in ours if (lo_major, lo_minor) <= v <= (hi_major, hi_minor)), None)
    if version is None:
        spoken = " and ".join(f"{major}.{minor}" for major, minor in reversed(ours))
        hint = "" if live or (hi_major, hi_minor) < P.LIVE_VERSION else \
            " (a live migration needs vmstate receive --run)"
        _refuse(sock, f"the sender speaks protocol {lo_major}.{lo_minor}-{hi_major}.{hi_minor}, "
                      f"this receiver {spoken}{hint}")
    if flags & ~P.FLAG_WITH_FILES or reserved:
        _refuse(sock, f"unknown flags {flags:#x} or reserved bits {reserved:#x} in the hello")
    if image_size > max_size:
        what = "guest memory" if version == P.LIVE_VERSION else "image"
        _refuse(sock, f"{what} of {image_size} bytes is larger than --max-size ({max_size})")
    P.send_reply(sock, P.STATUS_OK, f"protocol {version[0]}.{version[1]}")
    return image_size, bool(flags & P.FLAG_WITH_FILES), version


def _refuse(sock: socket.socket, reason: str):
    P.send_reply(sock, P.STATUS_REFUSED, reason)
    raise Refused(reason)


def _frame(sock: socket.socket) -> tuple[int, int, int]:
    kind, flags, reserved, offset, length = P.FRAME.unpack(
        P.recv_exact(sock, P.FRAME.size, "a frame header"))
    if flags or reserved or (kind not in (P.FRAME_IMAGE, P.FRAME_MEMORY) and offset):
        raise P.ProtocolError(f"frame of type {kind} with non-zero flags, reserved field or "
                              "offset")
    return kind, offset, length


def _receive_metadata(sock: socket.socket, sink: MemorySink, image_size: int) -> Received:
    kind, offset, length = _frame(sock)
    if kind != P.FRAME_IMAGE or offset != 0 or not L.HEADER.size <= length <= \
            min(MAX_METADATA, image_size):
        raise P.ProtocolError(f"the first frame must be the image metadata (got type {kind}, "
                              f"{length} bytes at {offset:#x})")
    data = _receive_metadata_bytes(sock, length)
    metadata = ImageMetadata("stream", lambda o, n: data[o:o + n], None)
    if metadata.file_size != image_size or metadata.metadata_size != length:
        raise P.ProtocolError(f"the metadata describes {metadata.file_size} bytes with "
                              f"{metadata.metadata_size} bytes of metadata; the sender announced "
                              f"{image_size} and sent {length}")
    sink.prepare(metadata)
    return Received(metadata, sink, image_bytes=length)


def _receive_metadata_bytes(sock: socket.socket, length: int) -> bytes:
    """The metadata frame's payload. Its header and section table come first and say how
    long the metadata is; a frame of another length is refused before more is read, and the
    rest is held only as it arrives (a peer must send what it makes the receiver keep)."""
    data = bytearray(P.recv_exact(sock, L.HEADER.size, "the image header"))
    count = L.HEADER.unpack(data)[4]
    table_end = L.HEADER.size + count * L.SECTION_ENTRY.size
    if table_end > length:
        raise P.ProtocolError(f"the image header announces {count} sections, a table longer "
                              f"than the {length}-byte metadata frame")
    data += P.recv_exact(sock, table_end - L.HEADER.size, "the section table")
    entries = [L.SECTION_ENTRY.unpack_from(data, L.HEADER.size + i * L.SECTION_ENTRY.size)
               for i in range(count)]
    payloads_end = max([table_end] + [offset + size for _, _, _, offset, size, _ in entries])
    has_memory = any(kind == L.MEMORY_REGION for kind, *_ in entries)
    needed = L.align(payloads_end, L.PAGE) if has_memory else payloads_end
    if needed != length:
        raise P.ProtocolError(f"a metadata frame of {length} bytes, but the image's header and "
                              f"section table make the metadata {needed} bytes")
    while len(data) < length:
        data += P.recv_exact(sock, min(P.CHUNK, length - len(data)), "the image metadata")
    return bytes(data)


def _receive_frames(sock: socket.socket, received: Received, root_fd: int, with_files: bool,
                    max_size: int) -> None:
    """Memory frames in order (hashed as they arrive), the chunk checksums, guest files,
    then the end frame."""
    stream = PresentStream(received.metadata.state.memory)
    placing = Placing(StreamChunkHashes(stream, received.metadata.state.memory))
    try:
        _receive_frames_in_order(sock, received, root_fd, with_files, max_size, stream,
                                 placing)
    finally:
        placing.wait()


def _receive_frames_in_order(sock: socket.socket, received: Received, root_fd: int,
                             with_files: bool, max_size: int, stream: PresentStream,
                             placing: Placing) -> None:
    while True:
        kind, offset, length = _frame(sock)
        if kind == P.FRAME_MEMORY:
            if offset != stream.position or not 0 < length <= P.MAX_MEMORY_FRAME \
                    or length % PAGE_SIZE or offset + length > stream.total:
                raise P.ProtocolError(f"unexpected memory frame ({length} bytes at stream offset "
                                      f"{offset:#x}): not the next whole pages of the "
                                      f"{stream.total} bytes of present memory")
            received.sink.receive(sock, stream.take(length), placing)
            received.image_bytes += length
        elif kind == P.FRAME_CHUNKS and stream.position == stream.total \
                and not received.final_metadata:
            placing.wait()
            received.final_metadata = _receive_chunks(sock, received.metadata,
                                                      placing.hashes, length)
        elif kind == P.FRAME_FILE and with_files and received.final_metadata:
            if received.total_bytes + length > max_size:
                raise P.ProtocolError(f"the VM and its files exceed --max-size ({max_size})")
            _receive_file(sock, received, root_fd, length)
            received.file_bytes += length
        elif kind == P.FRAME_END:
            if length != P.END.size:
                raise P.ProtocolError(f"end frame of {length} bytes (expected {P.END.size})")
            digest, sent = P.END.unpack(P.recv_exact(sock, P.END.size, "the end frame"))
            if stream.position != stream.total or not received.final_metadata:
                raise P.ProtocolError(f"the stream ended after {stream.position} of "
                                      f"{stream.total} bytes of memory"
                                      f"{'' if received.final_metadata else ', no checksums'}: "
                                      "truncated stream")
            if digest != checksum(received.final_metadata) or sent != received.image_bytes:
                raise P.ProtocolError("the end frame does not match what was received")
            return
        else:
            raise P.ProtocolError(f"unexpected frame of type {kind} ({length} bytes) here")


def _receive_chunks(sock: socket.socket, metadata: ImageMetadata, hashes: StreamChunkHashes,
                    length: int) -> bytes:
    """The sender's chunk checksums, compared with those of the memory received; returns the
    image metadata that carries them."""
    if length != sum(8 * len(h) for h in hashes.hashes):
        raise P.ProtocolError(f"a chunks frame of {length} bytes; the metadata has "
                              f"{sum(len(h) for h in hashes.hashes)} chunks of 8 bytes")
    data = P.recv_exact(sock, length, "the chunk checksums")
    theirs, at = [], 0
    for ours in hashes.hashes:
        theirs.append(array("Q", data[at:at + 8 * len(ours)]))
        at += 8 * len(ours)
    bad = first_difference(hashes.hashes, theirs)
    if bad is not None:
        raise ImageError(f"guest memory {chunk_address(metadata.state.memory, *bad):#x} fails "
                         "its checksum: corrupted in transit", "stream")
    return with_chunk_hashes(metadata.metadata(), theirs)


def _receive_file(sock: socket.socket, received: Received, root_fd: int, length: int) -> int:
    """One guest file into a nameless new file in its directory (named by commit_files);
    returns its content's checksum (checked)."""
    path_length, mode, size, digest = P.FILE_HEADER.unpack(
        P.recv_exact(sock, P.FILE_HEADER.size, "a file header"))
    if path_length > MAX_PATH or P.FILE_HEADER.size + path_length + size != length \
            or size > P.MAX_FILE_FRAME:
        raise P.ProtocolError(f"file frame of {length} bytes with a {path_length}-byte path "
                              f"and {size} bytes of content does not add up")
    path = os.fsdecode(P.recv_exact(sock, path_length, "a file path"))
    wanted = {f.path for f in received.metadata.state.vmm.files if f.kind == FD_FILE}
    if not is_inside_root(path) or path not in wanted \
            or path in (f.path for f in received.files):
        raise P.ProtocolError(f"file {path!r} is not one of the guest's open files inside the "
                              "root (or came twice)")
    directory, name = os.path.split(path)
    dir_fd = open_directory_beneath(root_fd, directory, create=True)
    try:
        pending = PendingFile(directory or ".", name, mode & MODE_BITS or 0o644, dir_fd)
    finally:
        os.close(dir_fd)
    received.files.append(ReceivedFile(path, pending))     # discarded on any failure
    hasher, buffer = xxhash.xxh3_64(), bytearray(min(size, P.CHUNK))
    written = 0
    while written < size:
        view = memoryview(buffer)[:min(size - written, len(buffer))]
        P.recv_exact_into(sock, view, f"file {path!r}")
        hasher.update(view)
        pwrite_all(pending.fd, view, written)
        written += len(view)
    if hasher.intdigest() != digest:
        raise P.ProtocolError(f"file {path!r} does not match its checksum: corrupted in transit")
    return digest


def commit_files(received: Received) -> None:
    """Give the received files their names (each rename replaces its file atomically)."""
    for received_file in received.files:
        received_file.pending.commit(os.path.basename(received_file.path))


def discard_files(received: Received) -> None:
    for received_file in received.files:
        received_file.pending.discard()


class ImageFileSink:
    """Received memory goes into a new image file with no name yet; it becomes `output`
    only after the whole file has been checked like any image."""

    def __init__(self, output: str):
        self.output = output
        self.file: PendingFile | None = None
        self.metadata: ImageMetadata | None = None
        self._staging = Staging()

    def prepare(self, metadata: ImageMetadata) -> None:
        self.metadata = metadata
        self.file = PendingFile(os.path.dirname(os.path.abspath(self.output)),
                                os.path.basename(self.output))
        os.ftruncate(self.file.fd, metadata.file_size)

    def receive(self, sock: socket.socket, pieces: list[tuple[int, np.ndarray]],
                placing: Placing) -> None:
        """Into staging buffers; then (in the worker) each run of pages to its place in the
        file."""
        for region, numbers in pieces:
            base = self.metadata.region_data[region].data_offset
            for start in range(0, len(numbers), PART_PAGES):
                part = numbers[start:start + PART_PAGES]
                staged = self._staging.next(len(part) * PAGE_SIZE)
                P.recv_exact_into(sock, staged, "memory")
                placing.add([staged], partial(self._write, staged, part, base))

    def _write(self, staged: memoryview, numbers: np.ndarray, base: int) -> None:
        for position, first, count in runs(numbers):
            pwrite_all(self.file.fd, staged[position * PAGE_SIZE:(position + count) * PAGE_SIZE],
                       base + first * PAGE_SIZE)

    def finish(self, final_metadata: bytes) -> None:
        """Write the metadata with its chunk checksums (the memory was checked against them);
        the file must read back as an image."""
        pwrite_all(self.file.fd, final_metadata, 0)
        with Image(f"/proc/self/fd/{self.file.fd}") as image:
            image.path = "the received image"

    def keep(self) -> str:
        self.file.commit(os.path.basename(self.output))
        self._staging.close()
        return self.output

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
        self._staging.close()


class Connection:
    """One sender's connection, as the serve loop hands it to a handler."""

    def __init__(self, sock: socket.socket, peer, min_rate: int):
        self.sock, self.peer = PacedSocket(sock, min_rate), f"{peer[0]}:{peer[1]}"
        self.acknowledged = False

    def acknowledge(self, message: str) -> None:
        """The final reply: the VM is verified and kept. Nothing is sent after it."""
        P.send_reply(self.sock, P.STATUS_OK, message)
        self.acknowledged = True

    def fail(self, reason: str, drain: bool) -> None:
        """Tell the sender why. After a failure of our own (`drain`), read what it is still
        sending, at its --min-rate pace and for DRAIN_TIME at most, so that the reply is not
        lost to a connection reset; a peer judged bad gets no more time."""
        try:
            P.send_reply(self.sock, P.STATUS_FAILED, reason)
            self.sock.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + DRAIN_TIME, bytearray(P.CHUNK if drain else 0)
            while drain and time.monotonic() < deadline and self.sock.recv_into(dropped):
                pass
        except (OSError, P.ProtocolError):
            pass


def serve(bind: str, port: int, handle: Callable[[Connection], None], once: bool,
          min_rate: int = DEFAULT_MIN_RATE, senders: int = 1, log=sys.stderr) -> int:
    """Serve senders on one listening socket; `handle` receives and keeps one VM. Up to
    `senders` connections are handled at once (each in its own thread if more than one;
    `handle` runs in this thread if one), the others wait in the listen backlog. Each sender
    has the deadlines of PacedSocket. A failure is logged in one line. With `once`, returns
    the failures (0 or 1) after the first sender; otherwise serves until interrupted."""
    with socket.create_server((bind, port), backlog=BACKLOG) as listener:
        print(f"Waiting for VM image on port {listener.getsockname()[1]}...", file=log,
              flush=True)                      # --port 0: the port the kernel chose
        if once or senders == 1:
            while True:
                failed = _serve_one(*listener.accept(), handle, min_rate, log)
                if once:
                    return int(failed)
        slots = threading.BoundedSemaphore(senders)
        while True:
            slots.acquire()
            try:
                sock, peer = listener.accept()
            except BaseException:
                slots.release()
                raise
            threading.Thread(target=_serve_in_slot, args=(sock, peer, handle, min_rate, log,
                                                          slots),
                             daemon=True, name=f"receive-{peer[0]}:{peer[1]}").start()


def _serve_in_slot(sock, peer, handle, min_rate: int, log, slots) -> None:
    try:
        _serve_one(sock, peer, handle, min_rate, log)
    finally:
        slots.release()


def _serve_one(sock: socket.socket, peer, handle: Callable[[Connection], None], min_rate: int,
               log) -> bool:
    """Handle one sender; True if it failed (logged in one line)."""
    with sock:
        connection = Connection(sock, peer, min_rate)
        try:
            handle(connection)
            return False
        except Exception as e:          # whatever a hostile stream triggers: log, go on
            reason = describe_error(e)
            if connection.acknowledged:
                print(f"vmstate: receive: the VM from {connection.peer} failed after it was "
                      f"accepted: {reason}", file=log, flush=True)
            else:
                print(f"vmstate: receive: rejected VM from {connection.peer}: {reason}",
                      file=log, flush=True)
                if not isinstance(e, Refused):
                    judged_bad = isinstance(e, (P.ProtocolError, FormatError))
                    connection.fail(reason, drain=not judged_bad)
            return True


def _place(dir_fd: int, name: str) -> tuple:
    """Where a name in a directory lands: the file it names if there is one, else the name."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=True)
        return st.st_dev, st.st_ino
    except OSError:
        directory = os.fstat(dir_fd)
        return directory.st_dev, directory.st_ino, name


def _refuse_files_over_the_image(sink: ImageFileSink, received: Received) -> None:
    """A guest file the sender carried must not be named over the image just received."""
    image = _place(sink.file.dir_fd, os.path.basename(sink.output))
    for received_file in received.files:
        if _place(received_file.pending.dir_fd, os.path.basename(received_file.path)) == image:
            raise P.ProtocolError(f"guest file {received_file.path!r} is the output image "
                                  f"{sink.output}: an output never replaces another")


def store_received(connection: Connection, root: str, output: str, max_size: int,
                   log=sys.stderr) -> str:
    """Receive one VM into `output` (an image file), after checking all of it."""
    root_fd = open_root(root)
    sink = ImageFileSink(output)
    try:
        received = receive_vm(connection.sock, sink, root_fd, max_size)
        print(f"Received {received.total_bytes} bytes", file=log, flush=True)
        try:
            sink.finish(received.final_metadata)
            _refuse_files_over_the_image(sink, received)
            where = sink.keep()
            commit_files(received)
        except BaseException:
            sink.discard()
            discard_files(received)
            raise
    finally:
        os.close(root_fd)
    connection.acknowledge(f"VM verified and stored as {where}")
    return where
