"""Descriptor system calls: close, dup, fcntl, pipes, poll and select, ioctl."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct

from vmstate.state import OpenFile

from .fdtable import FD_PIPE, GuestFile
from .paths import error
from .stops import CallInterrupted
from .table import signed32, syscall

F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1
SETFL_FLAGS = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | 0o20000  # O_ASYNC
CLOSE_RANGE_CLOEXEC = 4
TCGETS, TIOCGWINSZ, TIOCGPGRP, FIONREAD = 0x5401, 0x5413, 0x540F, 0x541B
TERMINAL_IOCTLS = {TCGETS: 60, TIOCGWINSZ: 8, TIOCGPGRP: 4}     # request: result size
POLLFD = struct.Struct("<ihh")
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 1, 2, 4, 8, 16, 32
TIMESPEC = struct.Struct("<qq")
TIMEVAL = struct.Struct("<qq")


@syscall(3, "close", "fd")
def sys_close(k, fd):
    k.files.close(signed32(fd))
    return 0


@syscall(436, "close_range", "int int hex")
def sys_close_range(k, first, last, flags):
    first, last = first & 0xFFFFFFFF, last & 0xFFFFFFFF
    if first > last or flags & ~CLOSE_RANGE_CLOEXEC:
        raise error(errno.EINVAL)
    k.files.close_range(first, last, cloexec_only=bool(flags & CLOSE_RANGE_CLOEXEC))
    return 0


@syscall(32, "dup", "fd")
def sys_dup(k, fd):
    return k.files.dup(signed32(fd))


@syscall(33, "dup2", "fd fd")
def sys_dup2(k, old, new):
    old, new = signed32(old), signed32(new)
    if old == new:
        k.files.get(old)
        return new
    return k.files.dup_to(old, new)


@syscall(292, "dup3", "fd fd oflags")
def sys_dup3(k, old, new, flags):
    old, new = signed32(old), signed32(new)
    if old == new or flags & ~os.O_CLOEXEC:
        raise error(errno.EINVAL)
    return k.files.dup_to(old, new, cloexec=bool(flags & os.O_CLOEXEC))


@syscall(72, "fcntl", "fd fcntl hex")
def sys_fcntl(k, fd, command, arg):
    fd, command = signed32(fd), signed32(command)
    guest_file = k.files.get(fd)
    match command:
        case 0 | 1030:                  # F_DUPFD, F_DUPFD_CLOEXEC
            return k.files.dup(fd, signed32(arg), cloexec=command == F_DUPFD_CLOEXEC)
        case 1:                         # F_GETFD
            return FD_CLOEXEC if k.files.is_cloexec(fd) else 0
        case 2:                         # F_SETFD
            k.files.set_cloexec(fd, bool(arg & FD_CLOEXEC))
            return 0
        case 3:                         # F_GETFL
            return fcntl.fcntl(guest_file.host_fd, fcntl.F_GETFL) & ~os.O_CLOEXEC
        case 4:                         # F_SETFL
            current = fcntl.fcntl(guest_file.host_fd, fcntl.F_GETFL)
            fcntl.fcntl(guest_file.host_fd, fcntl.F_SETFL,
                        (current & ~SETFL_FLAGS) | (arg & SETFL_FLAGS))
            return 0
        case 5 | 6 | 7:                 # record locks: one process, nothing to wait for
            return 0
    raise error(errno.EINVAL)


@syscall(73, "flock", "fd int")
def sys_flock(k, fd, operation):
    k.files.get(signed32(fd))
    return 0


@syscall(16, "ioctl", "fd ioctl ptr")
def sys_ioctl(k, fd, request, arg):
    guest_file = k.files.get(signed32(fd))
    request &= 0xFFFFFFFF
    if request == FIONREAD:
        count = fcntl.ioctl(guest_file.host_fd, FIONREAD, bytes(4))
        k.memory.write(arg, count)
        return 0
    if request not in TERMINAL_IOCTLS or not os.isatty(guest_file.host_fd):
        return -errno.ENOTTY
    size = TERMINAL_IOCTLS[request]
    k.memory.check(arg, size)
    k.memory.write(arg, fcntl.ioctl(guest_file.host_fd, request, bytes(size)))
    return 0


def make_pipe(k, flags: int) -> tuple[int, int]:
    if flags & ~(os.O_CLOEXEC | os.O_NONBLOCK | os.O_DIRECT):
        raise error(errno.EINVAL)
    if len(k.files.fds()) + 2 > k.files.max_fds:
        raise error(errno.EMFILE)
    read_end, write_end = os.pipe2(os.O_CLOEXEC | (flags & (os.O_NONBLOCK | os.O_DIRECT)))
    cloexec = bool(flags & os.O_CLOEXEC)
    fds = []
    for host_fd, access in ((read_end, os.O_RDONLY), (write_end, os.O_WRONLY)):
        fd = k.files.lowest_free_fd()
        fds.append(k.files.install(GuestFile(OpenFile(fd, FD_PIPE, "", access), host_fd), fd,
                                   cloexec))
    return fds[0], fds[1]


@syscall(22, "pipe", "ptr")
def sys_pipe(k, addr):
    return sys_pipe2(k, addr, 0)


@syscall(293, "pipe2", "ptr oflags")
def sys_pipe2(k, addr, flags):
    k.memory.check(addr, 8)
    read_fd, write_fd = make_pipe(k, flags)
    k.memory.write(addr, struct.pack("<ii", read_fd, write_fd))
    return 0


def _wait(k, readers: dict[int, list[int]], writers: dict[int, list[int]],
          timeout: float | None) -> tuple[set[int], set[int]]:
    """select() over host fds, woken by a host request to stop the VM (the call is then
    re-issued after the save)."""
    watch = list(readers) + [k.signal_wake_fd] + ([k.stop_fd] if k.stop_fd is not None else [])
    ready_r, ready_w, _ = select.select(watch, list(writers), [], timeout)
    if k.stop_fd is not None and k.stop_fd in ready_r:
        raise CallInterrupted()
    if k.signal_wake_fd in ready_r and not ready_w and len(ready_r) == 1:
        k.drain_signal_wake()
        raise error(errno.EINTR)          # a handled signal arrived: its handler runs now
    return set(ready_r), set(ready_w)


def _timeout(k, addr: int, struct_: struct.Struct, unit: int) -> float | None:
    if not addr:
        return None
    seconds, fraction = struct_.unpack(k.memory.read(addr, struct_.size))
    if seconds < 0 or not 0 <= fraction < unit:
        raise error(errno.EINVAL)
    return seconds + fraction / unit


def _poll(k, fds_addr: int, count: int, timeout: float | None) -> int:
    if count > k.files.max_fds:
        raise error(errno.EINVAL)
    entries = list(POLLFD.iter_unpack(k.memory.read(fds_addr, POLLFD.size * count)))
    readers: dict[int, list[int]] = {}
    writers: dict[int, list[int]] = {}
    revents = [0] * count
    for i, (fd, events, _) in enumerate(entries):
        if fd < 0:
            continue
        try:
            host_fd = k.files.get(fd).host_fd
        except OSError:
            revents[i] = POLLNVAL
            continue
        if events & (POLLIN | POLLPRI):
            readers.setdefault(host_fd, []).append(i)
        if events & POLLOUT:
            writers.setdefault(host_fd, []).append(i)
    if not any(revents):
        ready_r, ready_w = _wait(k, readers, writers, timeout)
        for host_fd in ready_r:
            for i in readers.get(host_fd, []):
                revents[i] |= POLLIN
        for host_fd in ready_w:
            for i in writers.get(host_fd, []):
                revents[i] |= POLLOUT
    out = b"".join(POLLFD.pack(fd, events, revents[i]) for i, (fd, events, _) in
                   enumerate(entries))
    k.memory.write(fds_addr, out)
    return sum(1 for r in revents if r)


@syscall(7, "poll", "ptr int int")
def sys_poll(k, fds, count, timeout_ms):
    timeout_ms = signed32(timeout_ms)
    return _poll(k, fds, count, None if timeout_ms < 0 else timeout_ms / 1000)


@syscall(271, "ppoll", "ptr int ptr ptr size")
def sys_ppoll(k, fds, count, timeout, sigmask, sigsetsize):
    return _poll(k, fds, count, _timeout(k, timeout, TIMESPEC, 10**9))


def _select(k, nfds: int, sets: tuple[int, int, int], timeout: float | None) -> int:
    nfds = signed32(nfds)
    if not 0 <= nfds <= k.files.max_fds:
        raise error(errno.EINVAL)
    size = (nfds + 63) // 64 * 8
    masks = [int.from_bytes(k.memory.read(addr, size), "little") if addr else 0
             for addr in sets]
    readers: dict[int, list[int]] = {}
    writers: dict[int, list[int]] = {}
    for fd in range(nfds):
        for mask, table in ((masks[0], readers), (masks[1], writers)):
            if mask >> fd & 1:
                table.setdefault(k.files.get(fd).host_fd, []).append(fd)
    ready_r, ready_w = _wait(k, readers, writers, timeout)
    results = [0, 0, 0]
    for ready, table, index in ((ready_r, readers, 0), (ready_w, writers, 1)):
        for host_fd in ready:
            for fd in table.get(host_fd, []):
                results[index] |= 1 << fd
    for addr, result in zip(sets, results):
        if addr:
            k.memory.write(addr, result.to_bytes(size, "little"))
    return sum(bin(r).count("1") for r in results)


@syscall(23, "select", "int ptr ptr ptr ptr")
def sys_select(k, nfds, readfds, writefds, exceptfds, timeout):
    return _select(k, nfds, (readfds, writefds, exceptfds), _timeout(k, timeout, TIMEVAL, 10**6))


@syscall(270, "pselect6", "int ptr ptr ptr ptr ptr")
def sys_pselect6(k, nfds, readfds, writefds, exceptfds, timeout, sigmask):
    return _select(k, nfds, (readfds, writefds, exceptfds), _timeout(k, timeout, TIMESPEC, 10**9))

