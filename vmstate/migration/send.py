"""The sending side: connect (retrying), stream the image and the guest's files, and report
success only on the receiver's final acknowledgement."""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
from array import array
from dataclasses import dataclass

import numpy as np
import xxhash

from linux_personality.paths import builtin_device

from ..chunks import chunk_count
from ..errors import ImageError
from ..image.reader import checksum
from ..image.writer import plan_image, with_chunk_hashes
from ..progress import progress_bar
from ..rootfs import open_beneath, open_root
from ..state import FD_FILE, PAGE_SIZE, VmState
from . import protocol as P
from .page_copy import runs
from .present_stream import PresentStream, StreamChunkHashes, chunk_address, first_difference

REPLY_TIMEOUT = 600          # the receiver verifies the whole VM before it answers
RETRY_INTERVAL = 1.0
IN_PLACE_MAX_RUNS = 64       # a frame of pages in at most this many runs is sent from guest memory itself
GATHER_PAGES = 256           # pages gathered at a time from a frame of more runs (1 MiB)


class MigrationFailed(P.ProtocolError):
    """The VM did not arrive: the receiver refused it, or the connection failed."""


@dataclass(frozen=True)
class GuestFile:
    """One of the guest's open regular files, to be carried with --with-files."""
    path: str
    mode: int
    host_fd: int


def guest_files(state: VmState, root: str) -> list[GuestFile]:
    """Open (beneath `root`) each regular file the guest has open, once per path; directories
    and other special files are not carried (the receiver opens them under its root)."""
    files: list[GuestFile] = []
    root_fd = open_root(root)
    try:
        seen = set()
        for f in state.vmm.files:
            if f.kind != FD_FILE or f.path in seen or builtin_device("/" + f.path):
                continue                  # /dev/null & co. are built into every VMM
            seen.add(f.path)
            fd = open_beneath(root_fd, f.path, os.O_RDONLY | os.O_NONBLOCK)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                files.append(GuestFile(f.path, f.mode, fd))
            else:
                os.close(fd)
        return files
    except BaseException:
        close_files(files)
        raise
    finally:
        os.close(root_fd)


def close_files(files: list[GuestFile]) -> None:
    for f in files:
        os.close(f.host_fd)


def send_to(address: tuple[str, int], connect_timeout: float, state: VmState,
            region_views: list[memoryview], with_files: bool, root: str,
            image: tuple[str, list] | None = None) -> str:
    """Connect and send the VM (with its open files' contents if `with_files`); returns the
    receiver's confirmation. `image`: the path and chunk checksums of the image the memory
    comes from, checked as it is sent."""
    files = guest_files(state, root) if with_files else []
    try:
        with connect(address, connect_timeout) as sock:
            return send_vm(sock, state, region_views, files, image)
    finally:
        close_files(files)


def connect(address: tuple[str, int], timeout: float, log=sys.stderr,
            cancelled: threading.Event | None = None) -> socket.socket:
    """Connect, retrying once a second until `timeout` seconds have passed. With `cancelled`,
    each attempt lasts at most a second and setting it ends the retries
    (ConnectionAbortedError)."""
    deadline = time.monotonic() + timeout
    attempt = max(1.0, timeout) if cancelled is None else RETRY_INTERVAL
    while True:
        try:
            sock = socket.create_connection(address, timeout=attempt)
            sock.settimeout(REPLY_TIMEOUT)
            return sock
        except OSError as e:
            if time.monotonic() + RETRY_INTERVAL > deadline:
                raise MigrationFailed(f"cannot connect to {address[0]}:{address[1]}: "
                                      f"{e.strerror or e}") from None
            print("connect failed, retry in 1 second...", file=log, flush=True)
            if cancelled is None:
                time.sleep(RETRY_INTERVAL)
            elif cancelled.wait(RETRY_INTERVAL):
                raise ConnectionAbortedError("cancelled") from None


def send_vm(sock: socket.socket, state: VmState, region_views: list[memoryview],
            files: list[GuestFile], image: tuple[str, list] | None = None) -> str:
    """Stream one VM; returns the receiver's message once it has verified and kept the VM.
    The chunk checksums are computed from the memory frames as they go (none before)."""
    unhashed = [array("Q", bytes(8 * chunk_count(region.size // PAGE_SIZE)))
                for region in state.memory]
    plan = plan_image(state, region_views, unhashed)
    stream = PresentStream(state.memory)
    hashes = StreamChunkHashes(stream, state.memory)
    try:
        flags = P.FLAG_WITH_FILES if files else 0
        sock.sendall(P.HELLO.pack(P.MAGIC, P.VERSION_MAJOR, P.VERSION_MINOR, P.VERSION_MAJOR,
                                  P.VERSION_MINOR, flags, plan.file_size, 0))
        status, message = P.recv_reply(sock)
        if status != P.STATUS_OK:
            raise MigrationFailed(f"the receiver refused the VM: {message}")
        P.send_frame(sock, P.FRAME_IMAGE, 0, plan.metadata)
        with progress_bar("sending memory", stream.total) as advance:
            for position, length, pieces in memory_frames(stream, region_views):
                header = [memoryview(P.FRAME.pack(P.FRAME_MEMORY, 0, 0, position, length))]
                for buffers in pieces:
                    hashes.feed(buffers)
                    P.send_buffers(sock, header + buffers)
                    header = []
                if advance is not None:
                    advance(length)
        if image is not None:
            _check_image(state, hashes.hashes, *image)
        P.send_frame(sock, P.FRAME_CHUNKS, 0, b"".join(h.tobytes() for h in hashes.hashes))
        for f in files:
            _send_file(sock, f)
        sent = len(plan.metadata) + stream.total
        P.send_frame(sock, P.FRAME_END, 0, P.END.pack(
            checksum(with_chunk_hashes(plan.metadata, hashes.hashes)), sent))
    except OSError as e:
        raise MigrationFailed(_early_reply(sock) or f"connection lost: {e.strerror or e}") \
            from None
    return acknowledgement(sock)


def _check_image(state: VmState, computed: list, path: str, known: list) -> None:
    """The memory sent is what the image's checksums say (else the image is corrupt)."""
    bad = first_difference(computed, known)
    if bad is not None:
        raise ImageError(f"guest memory {chunk_address(state.memory, *bad):#x} fails its "
                         "checksum (the memory is corrupt)", path)


def acknowledgement(sock: socket.socket) -> str:
    """The receiver's final word on the VM: its message if it took the VM, else
    MigrationFailed."""
    try:
        status, message = P.recv_reply(sock)
    except OSError as e:
        raise MigrationFailed(f"no answer from the receiver: {e.strerror or e}") from None
    if status != P.STATUS_OK:
        raise MigrationFailed(f"the receiver rejected the VM: {message}")
    return message


def memory_frames(stream: PresentStream, region_views: list[memoryview],
                  frame_bytes: int = P.MEMORY_FRAME):
    """The present pages of every region in order, as memory frames: (stream position,
    length, pieces), `frame_bytes` long but a region's last. The pieces are lists of buffers
    that together hold the frame's bytes in order; each is valid until the next is taken. A
    frame whose pages lie in a few runs is one piece, sent from guest memory itself; one of
    many runs comes in pieces of GATHER_PAGES pages that numpy gathers into one reused
    buffer (small enough to stay in the cache, and no fresh memory to fault in per frame)."""
    frame_pages = frame_bytes // PAGE_SIZE
    gathered = np.empty((GATHER_PAGES, PAGE_SIZE), np.uint8)
    position = 0
    for index, numbers in enumerate(stream.regions):
        view = region_views[index]
        for start in range(0, len(numbers), frame_pages):
            frame = numbers[start:start + frame_pages]
            if np.count_nonzero(np.diff(frame) != 1) < IN_PLACE_MAX_RUNS:
                pieces = iter([[view[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
                                for _, first, count in runs(frame)]])
            else:
                pieces = gathered_pieces(view, frame, gathered)
            yield position, len(frame) * PAGE_SIZE, pieces
            position += len(frame) * PAGE_SIZE


def gathered_pieces(view: memoryview, numbers: np.ndarray, buffer: np.ndarray):
    """The pages `numbers` of `view`, gathered by numpy into `buffer` a piece at a time. The
    gather uses mode="clip" (the numbers come from the region's own present set, so none is
    out of range): with the default mode="raise" numpy gathers into a temporary array and
    copies that into `buffer`."""
    pages = np.frombuffer(view, np.uint8).reshape(-1, PAGE_SIZE)
    for start in range(0, len(numbers), len(buffer)):
        piece = numbers[start:start + len(buffer)]
        out = buffer[:len(piece)]
        np.take(pages, piece, axis=0, out=out, mode="clip")
        yield [memoryview(out).cast("B")]


def _early_reply(sock: socket.socket) -> str | None:
    """The reason a receiver gave before it stopped reading, if it got through."""
    try:
        sock.settimeout(2.0)
        status, message = P.recv_reply(sock)
        return f"the receiver rejected the VM: {message}" if status != P.STATUS_OK else None
    except (OSError, P.ProtocolError):
        return None


def _send_file(sock: socket.socket, f: GuestFile) -> None:
    header, size, digest = file_header(f)
    sock.sendall(P.FRAME.pack(P.FRAME_FILE, 0, 0, 0, len(header) + size) + header)
    send_file_content(sock, f, size)


def file_header(f: GuestFile) -> tuple[bytes, int, int]:
    """A FILE frame's payload up to the content (FILE header and path), the content's size
    and its XXH3-64 (the file is read once to hash it)."""
    size = os.fstat(f.host_fd).st_size
    digest = xxhash.xxh3_64()
    for position in range(0, size, P.CHUNK):
        digest.update(os.pread(f.host_fd, P.CHUNK, position))
    path = os.fsencode(f.path)
    return P.FILE_HEADER.pack(len(path), f.mode, size, digest.intdigest()) + path, size, \
        digest.intdigest()


def send_file_content(sock: socket.socket, f: GuestFile, size: int) -> None:
    with os.fdopen(os.dup(f.host_fd), "rb") as content:     # sendfile(2), in the kernel
        if sock.sendfile(content, 0, size) != size:
            raise MigrationFailed(f"{f.path} shrank while it was being sent")


def send_image(path: str, address: tuple[str, int], with_files: bool, root: str,
               connect_timeout: float) -> str:
    """`vmstate send`: an existing image, checked first, to a receiver."""
    from ..image.reader import Image
    with Image(path) as image:
        return send_to(address, connect_timeout, image.state,
                       [image.region_view(i) for i in range(len(image.state.memory))],
                       with_files, root, (path, [data.chunk_hashes for data in image.region_data]))
