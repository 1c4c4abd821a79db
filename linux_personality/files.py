"""File system calls: open, read, write, seek, stat, close, ioctl."""

from __future__ import annotations

import errno
import fcntl
import os

from vmstate.state import FD_FILE

from .table import signed32, signed64, syscall
from .trace import AT_FDCWD

TIOCGWINSZ = 0x5413
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000


@syscall(0, "read", "fd out size")
def sys_read(k, fd, buf, count):
    view = k.memory.user_view(buf, count)
    k.wait_readable(fd)
    n = os.readv(k.host_fd(fd), [view])
    k.memory.mark_written(buf, n)
    return n


@syscall(1, "write", "fd in size")
def sys_write(k, fd, buf, count):
    return os.write(k.host_fd(fd), k.memory.user_view(buf, count))


@syscall(17, "pread64", "fd out size off")
def sys_pread64(k, fd, buf, count, offset):
    n = os.preadv(k.host_fd(fd), [k.memory.user_view(buf, count)], offset)
    k.memory.mark_written(buf, n)
    return n


@syscall(18, "pwrite64", "fd in size off")
def sys_pwrite64(k, fd, buf, count, offset):
    return os.pwrite(k.host_fd(fd), k.memory.user_view(buf, count), offset)


@syscall(19, "readv", "fd iov_out int")
def sys_readv(k, fd, iov, count):
    views = k.iovecs(iov, count, writable=True)
    k.wait_readable(fd)
    return os.readv(k.host_fd(fd), views)


@syscall(20, "writev", "fd iov_in int")
def sys_writev(k, fd, iov, count):
    return os.writev(k.host_fd(fd), k.iovecs(iov, count, writable=False))


@syscall(2, "open", "path oflags mode")
def sys_open(k, path, flags, mode):
    return sys_openat(k, AT_FDCWD, path, flags, mode)


@syscall(257, "openat", "dirfd path oflags mode")
def sys_openat(k, dirfd, path, flags, mode):
    return k.files.open(k.resolve(dirfd, path), flags & 0xFFFFFFFF, mode)


@syscall(3, "close", "fd")
def sys_close(k, fd):
    k.files.close(signed32(fd))
    return 0


@syscall(8, "lseek", "fd off whence")
def sys_lseek(k, fd, offset, whence):
    return os.lseek(k.host_fd(fd), signed64(offset), whence)


@syscall(5, "fstat", "fd ptr")
def sys_fstat(k, fd, buf):
    return k.write_stat(os.fstat(k.host_fd(fd)), buf)


@syscall(4, "stat", "path ptr")
def sys_stat(k, path, buf):
    return k.stat_path(k.resolve(AT_FDCWD, path), buf, nofollow=False)


@syscall(6, "lstat", "path ptr")
def sys_lstat(k, path, buf):
    return k.stat_path(k.resolve(AT_FDCWD, path), buf, nofollow=True)


@syscall(262, "newfstatat", "dirfd path ptr hex")
def sys_newfstatat(k, dirfd, path, buf, flags):
    if flags & AT_EMPTY_PATH and k.memory.read_cstring(path) == b"":
        return sys_fstat(k, dirfd, buf)
    return k.stat_path(k.resolve(dirfd, path), buf, nofollow=bool(flags & AT_SYMLINK_NOFOLLOW))


@syscall(16, "ioctl", "fd ioctl ptr")
def sys_ioctl(k, fd, request, arg):
    guest_file = k.files.get(signed32(fd))
    if request != TIOCGWINSZ or guest_file.entry.kind == FD_FILE:
        return -errno.ENOTTY
    k.memory.check(arg, 8)
    size = fcntl.ioctl(guest_file.host_fd, TIOCGWINSZ, bytes(8))
    k.memory.write(arg, size)
    return 0
