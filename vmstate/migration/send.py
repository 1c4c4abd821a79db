"""The sending side: connect (retrying), stream the image and the guest's files, and report
success only on the receiver's final acknowledgement."""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from dataclasses import dataclass

import xxhash

from linux_personality.paths import builtin_device

from ..image.reader import checksum
from ..image.writer import ImagePlan
from ..progress import progress_bar
from ..rootfs import open_beneath, open_root
from ..state import FD_FILE, PAGE_SIZE, VmState
from . import protocol as P

REPLY_TIMEOUT = 600          # the receiver verifies the whole VM before it answers
RETRY_INTERVAL = 1.0


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


def send_to(address: tuple[str, int], connect_timeout: float, plan: ImagePlan, state: VmState,
            with_files: bool, root: str) -> str:
    """Connect and send the VM (with its open files' contents if `with_files`); returns the
    receiver's confirmation."""
    files = guest_files(state, root) if with_files else []
    try:
        with connect(address, connect_timeout) as sock:
            return send_vm(sock, plan, files)
    finally:
        close_files(files)


def connect(address: tuple[str, int], timeout: float, log=sys.stderr) -> socket.socket:
    """Connect, retrying once a second until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=max(1.0, timeout))
            sock.settimeout(REPLY_TIMEOUT)
            return sock
        except OSError as e:
            if time.monotonic() + RETRY_INTERVAL > deadline:
                raise MigrationFailed(f"cannot connect to {address[0]}:{address[1]}: "
                                      f"{e.strerror or e}") from None
            print("connect failed, retry in 1 second...", file=log, flush=True)
            time.sleep(RETRY_INTERVAL)


def send_vm(sock: socket.socket, plan: ImagePlan, files: list[GuestFile]) -> str:
    """Stream one VM; returns the receiver's message once it has verified and kept the VM."""
    try:
        flags = P.FLAG_WITH_FILES if files else 0
        sock.sendall(P.HELLO.pack(P.MAGIC, P.VERSION_MAJOR, P.VERSION_MINOR, P.VERSION_MAJOR,
                                  P.VERSION_MINOR, flags, plan.file_size, 0))
        status, message = P.recv_reply(sock)
        if status != P.STATUS_OK:
            raise MigrationFailed(f"the receiver refused the VM: {message}")
        P.send_frame(sock, P.FRAME_IMAGE, 0, plan.metadata)
        with progress_bar("sending memory", plan.memory_bytes) as advance:
            for position, buffers, length in memory_frames(plan.regions):
                # gathered straight from the guest's memory, a few system calls per frame
                P.send_buffers(sock, [memoryview(P.FRAME.pack(P.FRAME_MEMORY, 0, 0, position,
                                                              length)), *buffers])
                if advance is not None:
                    advance(length)
        for f in files:
            _send_file(sock, f)
        sent = len(plan.metadata) + plan.memory_bytes
        P.send_frame(sock, P.FRAME_END, 0, P.END.pack(checksum(plan.metadata), sent))
    except OSError as e:
        raise MigrationFailed(_early_reply(sock) or f"connection lost: {e.strerror or e}") \
            from None
    return acknowledgement(sock)


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


def memory_frames(regions, frame_bytes: int = P.MEMORY_FRAME):
    """The present pages of every region (RegionMemory) in order, as memory frames:
    (stream position, buffers, length), each frame `frame_bytes` long but the last."""
    position, buffers, length = 0, [], 0
    for region in regions:
        view = region.view
        for first, count in region.runs:
            start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            while start < end:
                n = min(end - start, frame_bytes - length)
                buffers.append(view[start:start + n])
                length, start = length + n, start + n
                if length == frame_bytes:
                    yield position, buffers, length
                    position, buffers, length = position + length, [], 0
    if length:
        yield position, buffers, length


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
    from ..image.writer import plan_image
    with Image(path) as image:
        image.verify_memory()           # so its chunk checksums are those of these bytes
        plan = plan_image(image.state,
                          [image.region_view(i) for i in range(len(image.state.memory))],
                          [data.chunk_hashes for data in image.region_data])
        return send_to(address, connect_timeout, plan, image.state, with_files, root)
