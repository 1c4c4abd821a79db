"""The receiving side: treat the stream as hostile, check every length and offset against the
VM's own metadata, verify everything, and only then keep the VM.

Memory goes from the socket straight to where it will live: the new VM's memory (--run) or
the image file (-o). Guest files carried with --with-files land under the root only after
the whole VM has been verified."""

from __future__ import annotations

import mmap
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

from ..errors import ImageError, VmstateError
from ..image import layout as L
from ..image.reader import Image, ImageMetadata, checksum
from ..image.writer import pwrite_all, write_memory, MemoryPiece
from ..atomic import PendingFile
from ..rootfs import open_directory_beneath
from ..state import PAGE_SIZE
from ..validate import is_inside_root
from . import protocol as P

IDLE_TIMEOUT = 60            # seconds a sender may stay silent mid-stream
MAX_METADATA = 1 << 28


class MemorySink(Protocol):
    """Where received guest memory goes."""

    def prepare(self, metadata: ImageMetadata) -> None: ...
    def receive(self, sock: socket.socket, region: int, offset: int, length: int) -> None: ...
    def verify(self) -> None: ...
    def discard(self) -> None: ...


@dataclass
class Received:
    metadata: ImageMetadata
    sink: MemorySink
    files: list[tuple[str, int, str]] = field(default_factory=list)   # path, mode, temp name
    image_bytes: int = 0
    file_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.image_bytes + self.file_bytes


def receive_vm(sock: socket.socket, sink: MemorySink, root_fd: int, max_size: int) -> Received:
    """One VM from one sender; raises VmstateError naming what was wrong."""
    image_size, with_files = _hello(sock, max_size)
    received = None
    try:
        received = _receive_metadata(sock, sink, image_size)
        _receive_frames(sock, received, root_fd, with_files)
        received.sink.verify()
        return received
    except BaseException:
        sink.discard()
        if received is not None:
            discard_files(received, root_fd)
        raise


def _hello(sock: socket.socket, max_size: int) -> tuple[int, bool]:
    magic, lo_major, lo_minor, hi_major, hi_minor, flags, image_size = P.HELLO.unpack(
        P.recv_exact(sock, P.HELLO.size, "the hello"))
    if magic != P.MAGIC:
        _refuse(sock, f"bad magic {magic!r} (expected {P.MAGIC!r}): not a vmstate sender")
    if not (lo_major, lo_minor) <= (P.VERSION_MAJOR, P.VERSION_MINOR) <= (hi_major, hi_minor):
        _refuse(sock, f"the sender speaks protocol {lo_major}.{lo_minor}-{hi_major}.{hi_minor}, "
                      f"this receiver {P.VERSION_MAJOR}.{P.VERSION_MINOR}")
    if flags & ~P.FLAG_WITH_FILES:
        _refuse(sock, f"unknown flags {flags:#x}")
    if image_size > max_size:
        _refuse(sock, f"image of {image_size} bytes is larger than --max-size ({max_size})")
    P.send_reply(sock, P.STATUS_OK, f"protocol {P.VERSION_MAJOR}.{P.VERSION_MINOR}")
    return image_size, bool(flags & P.FLAG_WITH_FILES)


def _refuse(sock: socket.socket, reason: str):
    P.send_reply(sock, P.STATUS_REFUSED, reason)
    raise P.ProtocolError(reason)


def _frame(sock: socket.socket) -> tuple[int, int, int]:
    kind, _, _, offset, length = P.FRAME.unpack(P.recv_exact(sock, P.FRAME.size, "a frame"))
    return kind, offset, length


def _receive_metadata(sock: socket.socket, sink: MemorySink, image_size: int) -> Received:
    kind, offset, length = _frame(sock)
    if kind != P.FRAME_IMAGE or offset != 0 or not L.HEADER.size <= length <= MAX_METADATA:
        raise P.ProtocolError(f"the first frame must be the image metadata (got type {kind}, "
                              f"{length} bytes at {offset:#x})")
    data = P.recv_exact(sock, length, "the image metadata")
    metadata = ImageMetadata("stream", lambda o, n: data[o:o + n], None)
    if metadata.file_size != image_size or metadata.metadata_size != length:
        raise P.ProtocolError(f"the metadata describes {metadata.file_size} bytes in "
                              f"{metadata.metadata_size} bytes of metadata; the sender announced "
                              f"{image_size} and sent {length}")
    sink.prepare(metadata)
    return Received(metadata, sink, image_bytes=length)


def _receive_frames(sock: socket.socket, received: Received, root_fd: int,
                    with_files: bool) -> None:
    expected = _expected_pieces(received.metadata)
    position = 0
    while True:
        kind, offset, length = _frame(sock)
        if kind == P.FRAME_IMAGE:
            if position >= len(expected) or (offset, length) != expected[position][1:]:
                raise P.ProtocolError(f"unexpected memory frame ({length} bytes at file offset "
                                      f"{offset:#x}): not one of the image's extents, in order")
            received.sink.receive(sock, expected[position][0], offset, length)
            received.image_bytes += length
            position += 1
        elif kind == P.FRAME_FILE and with_files:
            _receive_file(sock, received, root_fd, length)
            received.file_bytes += length
        elif kind == P.FRAME_END and length == P.END.size:
            digest, sent = P.END.unpack(P.recv_exact(sock, P.END.size, "the end frame"))
            if position != len(expected):
                raise P.ProtocolError(f"the stream ended after {position} of {len(expected)} "
                                      "memory extents: truncated stream")
            if digest != received.metadata.digest() or sent != received.image_bytes:
                raise P.ProtocolError("the end frame does not match what was received")
            return
        else:
            raise P.ProtocolError(f"unexpected frame type {kind} ({length} bytes)")


def _expected_pieces(metadata: ImageMetadata) -> list[tuple[int, int, int]]:
    """(region, file offset, length) of every memory extent, in file order."""
    return [(i, data.data_offset + e.first_page * PAGE_SIZE, e.page_count * PAGE_SIZE)
            for i, data in enumerate(metadata.region_data) for e in data.extents]


def _receive_file(sock: socket.socket, received: Received, root_fd: int, length: int) -> None:
    """One guest file into a temporary name beside its final one (kept for commit_files)."""
    path_length, mode, size, digest = P.FILE_HEADER.unpack(
        P.recv_exact(sock, P.FILE_HEADER.size, "a file header"))
    if path_length > 4096 or P.FILE_HEADER.size + path_length + size != length \
            or size > P.MAX_FILE_FRAME:
        raise P.ProtocolError(f"file frame of {length} bytes with a {path_length}-byte path "
                              f"and {size} bytes of content does not add up")
    path = os.fsdecode(P.recv_exact(sock, path_length, "a file path"))
    wanted = {f.path for f in received.metadata.state.vmm.files if f.kind == "file"}
    if not is_inside_root(path) or path not in wanted \
            or path in (p for p, _, _ in received.files):
        raise P.ProtocolError(f"file {path!r} is not one of the guest's open files inside "
                              "the root (or came twice)")
    directory, name = os.path.split(path)
    temporary = f".{name}.vmstate-receive"
    dir_fd = open_directory_beneath(root_fd, directory, create=True)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, mode & 0o7777 or 0o644, dir_fd=dir_fd)
        received.files.append((path, mode, temporary))     # discarded on any failure
        try:
            hasher, buffer = xxhash.xxh3_64(), bytearray(min(size, P.CHUNK))
            remaining = size
            while remaining:
                view = memoryview(buffer)[:min(remaining, len(buffer))]
                P.recv_exact_into(sock, view, f"file {path!r}")
                hasher.update(view)
                pwrite_all(fd, view, size - remaining)
                remaining -= len(view)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    if hasher.intdigest() != digest:
        raise P.ProtocolError(f"file {path!r} does not match its checksum: corrupted in transit")


def _remove_beneath(root_fd: int, directory: str, name: str) -> None:
    dir_fd = open_directory_beneath(root_fd, directory, create=False)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def commit_files(received: Received, root_fd: int) -> None:
    """Move the received files into place (each rename is atomic)."""
    for path, _, temporary in received.files:
        directory, name = os.path.split(path)
        dir_fd = open_directory_beneath(root_fd, directory, create=False)
        try:
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def discard_files(received: Received, root_fd: int) -> None:
    for path, _, temporary in received.files:
        _remove_beneath(root_fd, os.path.dirname(path), temporary)


def verify_extents(metadata: ImageMetadata, region_views: list[memoryview]) -> None:
    """Every extent's checksum, computed over where the memory landed."""
    jobs = [(i, e, region_views[i][e.first_page * PAGE_SIZE:
                                   (e.first_page + e.page_count) * PAGE_SIZE])
            for i, data in enumerate(metadata.region_data) for e in data.extents]
    with ThreadPoolExecutor(2) as pool:
        for (i, extent, _), digest in zip(jobs, pool.map(lambda job: checksum(job[2]), jobs)):
            if digest != extent.hash:
                gpa = metadata.state.memory[i].guest_phys_addr + extent.first_page * PAGE_SIZE
                raise ImageError(f"guest memory {gpa:#x} fails its checksum: corrupted in "
                                 "transit", "stream")


class ImageFileSink:
    """Received memory goes into a new image file with no name yet; it becomes `output`
    only after the whole file has been checked like any image."""

    def __init__(self, output: str):
        self.output = output
        self.file: PendingFile | None = None
        self._staging = None

    def prepare(self, metadata: ImageMetadata) -> None:
        self.file = PendingFile(os.path.dirname(os.path.abspath(self.output)),
                                os.path.basename(self.output))
        os.ftruncate(self.file.fd, metadata.file_size)
        pwrite_all(self.file.fd, metadata.metadata(), 0)
        self._staging = mmap.mmap(-1, P.MAX_FRAME)     # page-aligned, so O_DIRECT can write it

    def receive(self, sock: socket.socket, region: int, offset: int, length: int) -> None:
        view = memoryview(self._staging)[:length]
        P.recv_exact_into(sock, view, f"memory at file offset {offset:#x}")
        write_memory(self.file.fd, [MemoryPiece(offset, view)])

    def verify(self) -> None:
        with Image(f"/proc/self/fd/{self.file.fd}") as image:
            image.path = "the received image"
            image.verify_memory()

    def keep(self) -> str:
        self.file.commit(self.output)
        self._release_staging()
        return self.output

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
        self._release_staging()

    def _release_staging(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def serve(bind: str, port: int, handle, once: bool, log=sys.stderr) -> int:
    """Accept senders one at a time; `handle(connection, peer)` receives and keeps one VM.
    A failure is logged in one line and the next sender is served (unless `once`)."""
    listener = socket.create_server((bind, port), reuse_port=False)
    print(f"Waiting for VM image on port {port}...", file=log, flush=True)
    failures = 0
    with listener:
        while True:
            connection, peer = listener.accept()
            connection.settimeout(IDLE_TIMEOUT)
            with connection:
                try:
                    handle(connection, peer)
                except (VmstateError, OSError) as e:
                    failures += 1
                    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    print(f"vmstate: receive: rejected VM from {peer[0]}:{peer[1]}: {reason}",
                          file=log, flush=True)
                    try:
                        P.send_reply(connection, P.STATUS_FAILED, reason)
                    except OSError:
                        pass
            if once:
                return failures


def store_received(connection: socket.socket, root: str, output: str, max_size: int,
                   log=sys.stderr) -> str:
    """Receive one VM into `output` (an image file), after checking all of it."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sink = ImageFileSink(output)
    try:
        received = receive_vm(connection, sink, root_fd, max_size)
        print(f"Received {received.total_bytes} bytes", file=log, flush=True)
        try:
            commit_files(received, root_fd)
            where = sink.keep()
        except BaseException:
            sink.discard()
            discard_files(received, root_fd)
            raise
    finally:
        os.close(root_fd)
    P.send_reply(connection, P.STATUS_OK, f"VM verified and stored as {where}")
    return where
