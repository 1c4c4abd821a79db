"""strace-like formatting of guest system calls for `vmstate run --trace`.

Each call's arguments are described by kinds (see FORMATTERS); a line looks like
    openat(AT_FDCWD, "./ay_caramba.txt", O_RDWR|O_CREAT|O_LARGEFILE, 0777) = 3
"""

from __future__ import annotations

import errno
import os
import struct

from vmstate.linux import flag_names, open_flag_names

from .cpu import GuestFault, GuestMemory
from vmstate.syscall_names import SYSCALL_NAMES

SHOWN_BYTES = 32
SHOWN_IOVECS = 4

PROT_FLAGS = [(1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")]
MAP_FLAGS = [(0x01, "MAP_SHARED"), (0x02, "MAP_PRIVATE"), (0x10, "MAP_FIXED"),
             (0x20, "MAP_ANONYMOUS"), (0x100, "MAP_GROWSDOWN"), (0x4000, "MAP_NORESERVE"),
             (0x8000, "MAP_POPULATE")]
CLOCKS = ["CLOCK_REALTIME", "CLOCK_MONOTONIC", "CLOCK_PROCESS_CPUTIME_ID",
          "CLOCK_THREAD_CPUTIME_ID", "CLOCK_MONOTONIC_RAW", "CLOCK_REALTIME_COARSE",
          "CLOCK_MONOTONIC_COARSE", "CLOCK_BOOTTIME"]
ARCH_CODES = {0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS",
              0x1004: "ARCH_GET_GS"}
IOCTLS = {0x5401: "TCGETS", 0x5413: "TIOCGWINSZ"}
WHENCE = ["SEEK_SET", "SEEK_CUR", "SEEK_END", "SEEK_DATA", "SEEK_HOLE"]
AT_FDCWD = -100


def _signed(value: int, bits: int = 64) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _quote(data: bytes, truncated: bool) -> str:
    out = []
    for b in data:
        ch = chr(b)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif 32 <= b < 127:
            out.append(ch)
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"' + ("..." if truncated else "")


def _buffer(memory: GuestMemory, addr: int, length: int) -> str:
    shown = max(0, min(length, SHOWN_BYTES))
    try:
        return _quote(memory.read(addr, shown), length > shown)
    except GuestFault:
        return hex(addr)


def _string(memory: GuestMemory, addr: int) -> str:
    try:
        return _quote(memory.read_cstring(addr), False)
    except GuestFault:
        return hex(addr)


def _iovecs(memory: GuestMemory, addr: int, count: int, total: int | None) -> str:
    """[{iov_base="...", iov_len=N}, ...]; for reads, `total` limits what is shown as data."""
    try:
        raw = memory.read(addr, 16 * min(max(count, 0), SHOWN_IOVECS))
    except GuestFault:
        return hex(addr)
    parts, remaining = [], total
    for base, length in struct.iter_unpack("<QQ", raw):
        shown = length if remaining is None else max(0, min(length, remaining))
        if remaining is not None:
            remaining -= shown
        parts.append(f"{{iov_base={_buffer(memory, base, shown)}, iov_len={length}}}")
    return "[" + ", ".join(parts) + (", ..." if count > SHOWN_IOVECS else "") + "]"


def format_arg(kind: str, value: int, length: int, result: int, memory: GuestMemory) -> str:
    """Format one argument. Buffer kinds take their length from the argument after them."""
    match kind:
        case "fd" | "int":
            return str(_signed(value, 32))
        case "dirfd":
            return "AT_FDCWD" if _signed(value, 32) == AT_FDCWD else str(_signed(value, 32))
        case "size" | "off":
            return str(_signed(value))
        case "path":
            return _string(memory, value)
        case "in":
            return _buffer(memory, value, length)
        case "out":
            return _buffer(memory, value, result) if result >= 0 else hex(value)
        case "iov_in":
            return _iovecs(memory, value, length, None)
        case "iov_out":
            return _iovecs(memory, value, length, max(result, 0))
        case "oflags":
            return open_flag_names(value)
        case "mode":
            return f"0{value:o}" if value else "0"
        case "prot":
            return flag_names(value, PROT_FLAGS, "PROT_NONE")
        case "mflags":
            return flag_names(value, MAP_FLAGS)
        case "whence":
            return WHENCE[value] if value < len(WHENCE) else str(value)
        case "clock":
            return CLOCKS[value] if value < len(CLOCKS) else str(_signed(value, 32))
        case "arch":
            return ARCH_CODES.get(value, hex(value))
        case "ioctl":
            return IOCTLS.get(value, hex(value))
    return hex(value)


def format_result(result: int | None, pointer: bool = False) -> str:
    if result is None:      # the call did not return (exit, save)
        return "?"
    if result < 0 and -result < 4096:
        code = -result
        name = errno.errorcode.get(code, f"E{code}")
        return f"-1 {name} ({os.strerror(code)})"
    return hex(result) if pointer else str(result)


def format_call(nr: int, name: str | None, kinds: tuple[str, ...], args: tuple[int, ...],
                result: int | None, memory: GuestMemory) -> str:
    if name is None:   # not serviced: name it from the table and show raw arguments
        label = SYSCALL_NAMES.get(nr, f"syscall_{nr}")
        return f"{label}({', '.join(hex(a) for a in args)}) = {format_result(result)}"
    shown = args[:len(kinds)]
    following = (*shown[1:], 0)
    returned = -1 if result is None else result     # out-buffers show nothing if no return
    text = ", ".join(format_arg(kind, value, length, returned, memory)
                     for kind, value, length in zip(kinds, shown, following))
    return f"{name}({text}) = {format_result(result, pointer=name in ('mmap', 'brk'))}"
