"""The migration wire protocol, format 2.1: structures declared once, and framed socket I/O.

    sender                                     receiver
      HELLO  (magic, versions, flags, image size)  ->
                                               <-  REPLY (0: go on | refusal and reason)
      FRAME IMAGE (offset 0: image metadata,       ->
                   every chunk checksum zero)
      FRAME MEMORY (the present pages, in order)   ->   straight into guest memory / the file
      FRAME CHUNKS (the chunk checksums)           ->   compared with the receiver's own
      FRAME FILE  (with --with-files)              ->
      FRAME END   (metadata digest, byte count)    ->
                                               <-  REPLY (0: verified and stored or started)

Both ends compute the chunk checksums from the memory frames as they go by
(present_stream.py), so neither hashes guest memory before or after the transfer; 2.0 sent
them in the metadata, before the memory, and is refused.

Version 3.0 (live migration, receive --run only) keeps HELLO, REPLY and the frame header; the
header's offset field holds XXH3-64 of the frame's payload, and the frames are LAYOUT, rounds
of PAGES (a page may come again), STATE (vCPU and VMM state as image metadata without
memory), FILE, END (with a digest of the final memory).
live_send.py and live_receive.py speak it.
"""

from __future__ import annotations

import socket
import struct

from ..errors import VmstateError, shorten

MAGIC = b"VMSTMIG\0"
VERSION_MAJOR, VERSION_MINOR = 2, 1
LIVE_VERSION = (3, 0)                     # live migration (pre-copy)
HELLO = struct.Struct("<8sHHHHIQI")       # magic, min major, min minor, max major, max minor,
                                          # flags, image size (bytes of the image file), reserved
FLAG_WITH_FILES = 0x1
FRAME = struct.Struct("<HHIQQ")           # type, flags, reserved, offset, length; payload follows
REPLY = struct.Struct("<II")              # status, message length; UTF-8 message follows
FILE_HEADER = struct.Struct("<IIQQ")      # path length, mode, content length, XXH3-64 of content
END = struct.Struct("<QQ")                # XXH3-64 of the image metadata with its chunk
                                          # checksums, metadata frame + memory bytes sent

FRAME_IMAGE, FRAME_FILE, FRAME_END, FRAME_MEMORY = 1, 2, 3, 4
FRAME_LAYOUT, FRAME_PAGES, FRAME_STATE, FRAME_SYNC = 5, 6, 7, 8     # protocol 3.0
FRAME_CHUNKS = 9                          # 2.1: u64 chunk checksums of every region, in order
LAYOUT_REGION = struct.Struct("<QQ")      # 3.0 LAYOUT payload, per region: guest physical, size
PAGE_NUMBER = struct.Struct("<Q")         # 3.0 PAGES payload: page numbers, then the pages
LIVE_END = struct.Struct("<QQQ")          # 3.0 END: frames before it, their payload bytes,
                                          # XXH3-64 of the page digest table
MAX_PAGES_FRAME = 16384                   # pages in one 3.0 PAGES frame (64 MiB)
STATUS_OK, STATUS_REFUSED, STATUS_FAILED = 0, 1, 2
MAX_FILE_FRAME = 1 << 30
MAX_REPLY = 4096
CHUNK = 4 << 20                           # socket reads and writes move this much at a time
MAX_MEMORY_FRAME = 64 << 20               # memory frames carry at most this many bytes
MEMORY_FRAME = 16 << 20                   # what vmstate's sender puts in one
IOV_MAX = 1024                            # buffers per sendmsg/recvmsg_into call


class ProtocolError(VmstateError):
    """The peer broke the protocol or the connection."""


def recv_exact_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill `view` from the socket (straight into its memory), or ProtocolError."""
    received = 0
    while received < len(view):
        n = sock.recv_into(view[received:received + CHUNK])
        if n == 0:
            raise ProtocolError(f"connection closed after {received} of {len(view)} bytes of "
                                f"{what}: truncated stream")
        received += n


def recv_into_buffers(sock: socket.socket, buffers: list[memoryview], what: str) -> None:
    """Fill each buffer in turn from the socket: scattered reads, IOV_MAX buffers a call."""
    received, total, start = 0, sum(len(b) for b in buffers), 0
    while start < len(buffers):
        n = sock.recvmsg_into(buffers[start:start + IOV_MAX])[0]
        if n == 0:
            raise ProtocolError(f"connection closed after {received} of {total} bytes of "
                                f"{what}: truncated stream")
        received += n
        start = _advance(buffers, start, n)


def send_buffers(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Send the buffers in order: gathered writes, IOV_MAX buffers a call."""
    start = 0
    while start < len(buffers):
        start = _advance(buffers, start, sock.sendmsg(buffers[start:start + IOV_MAX]))


def _advance(buffers: list[memoryview], start: int, done: int) -> int:
    """Drop `done` bytes from buffers[start:]: the index of the first unfinished buffer (a
    partly done one is cut to its rest in place)."""
    while done and start < len(buffers):
        if done >= len(buffers[start]):
            done -= len(buffers[start])
            start += 1
        else:
            buffers[start] = buffers[start][done:]
            done = 0
    while start < len(buffers) and not len(buffers[start]):
        start += 1
    return start


def recv_exact(sock: socket.socket, length: int, what: str) -> bytes:
    buffer = bytearray(length)
    recv_exact_into(sock, memoryview(buffer), what)
    return bytes(buffer)


def send_frame(sock: socket.socket, kind: int, offset: int, payload) -> None:
    view = memoryview(payload).cast("B")
    sock.sendall(FRAME.pack(kind, 0, 0, offset, len(view)))
    for start in range(0, len(view), CHUNK):
        sock.sendall(view[start:start + CHUNK])


def send_reply(sock: socket.socket, status: int, message: str) -> None:
    text = message.encode()[:MAX_REPLY]
    sock.sendall(REPLY.pack(status, len(text)) + text)


def recv_reply(sock: socket.socket) -> tuple[int, str]:
    """(status, message); the message is cut to printable characters (it comes from a peer)."""
    status, length = REPLY.unpack(recv_exact(sock, REPLY.size, "the receiver's reply"))
    if length > MAX_REPLY:
        raise ProtocolError(f"reply of {length} bytes (at most {MAX_REPLY})")
    text = recv_exact(sock, length, "the receiver's reply").decode(errors="replace")
    return status, "".join(ch if ch.isprintable() else "?" for ch in text)


def parse_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    try:
        number = int(port) if colon and port.isdigit() else -1
    except ValueError:
        number = -1
    if number < 0:
        raise VmstateError(f"bad address {shorten(text)!r} (expected HOST:PORT)")
    if not 0 < number < 65536:
        raise VmstateError(f"bad port {shorten(port)} in {shorten(text)!r} (1 to 65535)")
    return host.strip("[]"), number
