"""The Linux system calls the VMM services for its guest.

Handlers are registered by number with a name and argument kinds (for --trace). They take the
raw argument registers and return the value for RAX: a result, or a negative errno. Guest
pointers are checked by GuestMemory (a bad one gives -EFAULT); host errors become -errno.
Everything not registered returns -ENOSYS.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from vmstate import x86
from vmstate.state import FD_FILE, FD_STDIN

from .address_space import MAP_ANONYMOUS, UserAddressSpace
from vmstate.rootfs import normalize_guest_path, open_beneath

from .files import FileTable
from .memory import GuestFault, GuestMemory
from .trace import AT_FDCWD, format_call

GUEST_PID = 1
IOV_MAX = 1024
GETRANDOM_MAX = 1 << 25
TIOCGWINSZ = 0x5413
ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
SYSCALL_SAVE = 400          # the ScratchVM lab's convention: the guest asks for a SAVE
STAT = struct.Struct("<QQQIIIIQqqqQQQQQQ24x")       # struct stat, x86-64 (144 bytes)
TIMESPEC = struct.Struct("<qq")
IOVEC = struct.Struct("<QQ")


class GuestExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class SaveRequested(Exception):
    """The guest asked for a SAVE (syscall 400)."""


class CallInterrupted(Exception):
    """A blocking call was interrupted by a host request to stop the VM; the guest will
    re-issue it when it resumes."""


class CpuAccess(Protocol):
    """What system calls need of the vCPU beyond memory: the FS/GS segment bases."""
    def segment_base(self, name: str) -> int: ...
    def set_segment_base(self, name: str, value: int) -> None: ...


@dataclass(frozen=True)
class Syscall:
    nr: int
    name: str
    kinds: tuple[str, ...]
    handler: Callable[..., int]


SYSCALLS: dict[int, Syscall] = {}


def syscall(nr: int, name: str, kinds: str = ""):
    def register(handler):
        SYSCALLS[nr] = Syscall(nr, name, tuple(kinds.split()), handler)
        return handler
    return register


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


class LinuxSyscalls:
    def __init__(self, memory: GuestMemory, files: FileTable, address_space: UserAddressSpace,
                 cpu: CpuAccess, *, trace=None, stop_fd: int | None = None,
                 save_enabled: bool = False):
        self.memory = memory
        self.files = files
        self.address_space = address_space
        self.cpu = cpu
        self.trace = trace
        self.stop_fd = stop_fd
        self.save_enabled = save_enabled

    def dispatch(self, nr: int, args: tuple[int, ...]) -> int:
        """The call's result for RAX. GuestExit, SaveRequested and CallInterrupted propagate:
        those calls do not return to the guest (now)."""
        entry = SYSCALLS.get(nr)
        result = None
        try:
            result = self._call(entry, args) if entry is not None else -errno.ENOSYS
        finally:
            if self.trace is not None:
                self._trace(nr, entry, args, result)
        return result

    def _call(self, entry: Syscall, args: tuple[int, ...]) -> int:
        try:
            return entry.handler(self, *args[:len(entry.kinds)])
        except GuestFault:
            return -errno.EFAULT
        except OSError as e:
            return -(e.errno or errno.EIO)
        except (OverflowError, ValueError):     # 64-bit values the host call cannot take
            return -errno.EINVAL

    def _trace(self, nr: int, entry: Syscall | None, args, result: int | None) -> None:
        if entry is None:
            line = format_call(nr, None, (), args, result, self.memory)
        else:
            line = format_call(nr, entry.name, entry.kinds, args, result, self.memory)
        print(line, file=self.trace, flush=True)

    # -- helpers ---------------------------------------------------------------------------

    def _host_fd(self, fd: int) -> int:
        return self.files.get(_signed32(fd)).host_fd

    def _wait_readable(self, fd: int) -> None:
        """Block until guest fd `fd` can be read, unless the host asks the VM to stop."""
        guest_file = self.files.get(_signed32(fd))
        if self.stop_fd is None or guest_file.entry.kind != FD_STDIN:
            return
        ready, _, _ = select.select([guest_file.host_fd, self.stop_fd], [], [])
        if self.stop_fd in ready:
            raise CallInterrupted()

    def _iovecs(self, addr: int, count: int, *, writable: bool) -> list[memoryview]:
        if not 0 <= count <= IOV_MAX:
            raise OSError(errno.EINVAL, "bad iovec count")
        views = []
        for base, length in IOVEC.iter_unpack(self.memory.read(addr, IOVEC.size * count)):
            views.append(self.memory.user_view(base, length))
            if writable:
                self.memory.mark_written(base, length)
        return views

    def _resolve(self, dirfd: int, path_addr: int) -> str:
        path = os.fsdecode(self.memory.read_cstring(path_addr))
        if _signed32(dirfd) != AT_FDCWD and not path.startswith("/"):
            directory = self.files.get(_signed32(dirfd)).entry
            if directory.kind != FD_FILE:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            path = f"{directory.path}/{path}"
        return path

    def _write_stat(self, st: os.stat_result, addr: int) -> int:
        self.memory.write(addr, STAT.pack(
            st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, int(st.st_atime), st.st_atime_ns % 10**9,
            int(st.st_mtime), st.st_mtime_ns % 10**9, int(st.st_ctime), st.st_ctime_ns % 10**9))
        return 0

    def _stat_path(self, path: str, addr: int, nofollow: bool) -> int:
        flags = os.O_PATH | (os.O_NOFOLLOW if nofollow else 0)
        host_fd = open_beneath(self.files.root_fd, normalize_guest_path(path), flags, 0)
        try:
            return self._write_stat(os.fstat(host_fd), addr)
        finally:
            os.close(host_fd)

    # -- files -----------------------------------------------------------------------------

    @syscall(0, "read", "fd out size")
    def sys_read(self, fd, buf, count):
        view = self.memory.user_view(buf, count)
        self._wait_readable(fd)
        n = os.readv(self._host_fd(fd), [view])
        self.memory.mark_written(buf, n)
        return n

    @syscall(1, "write", "fd in size")
    def sys_write(self, fd, buf, count):
        return os.write(self._host_fd(fd), self.memory.user_view(buf, count))

    @syscall(17, "pread64", "fd out size off")
    def sys_pread64(self, fd, buf, count, offset):
        n = os.preadv(self._host_fd(fd), [self.memory.user_view(buf, count)], offset)
        self.memory.mark_written(buf, n)
        return n

    @syscall(18, "pwrite64", "fd in size off")
    def sys_pwrite64(self, fd, buf, count, offset):
        return os.pwrite(self._host_fd(fd), self.memory.user_view(buf, count), offset)

    @syscall(19, "readv", "fd iov_out int")
    def sys_readv(self, fd, iov, count):
        views = self._iovecs(iov, count, writable=True)
        self._wait_readable(fd)
        return os.readv(self._host_fd(fd), views)

    @syscall(20, "writev", "fd iov_in int")
    def sys_writev(self, fd, iov, count):
        return os.writev(self._host_fd(fd), self._iovecs(iov, count, writable=False))

    @syscall(2, "open", "path oflags mode")
    def sys_open(self, path, flags, mode):
        return self.sys_openat(AT_FDCWD, path, flags, mode)

    @syscall(257, "openat", "dirfd path oflags mode")
    def sys_openat(self, dirfd, path, flags, mode):
        return self.files.open(self._resolve(dirfd, path), flags & 0xFFFFFFFF, mode)

    @syscall(3, "close", "fd")
    def sys_close(self, fd):
        self.files.close(_signed32(fd))
        return 0

    @syscall(8, "lseek", "fd off whence")
    def sys_lseek(self, fd, offset, whence):
        return os.lseek(self._host_fd(fd), offset - (1 << 64) if offset >> 63 else offset, whence)

    @syscall(5, "fstat", "fd ptr")
    def sys_fstat(self, fd, buf):
        return self._write_stat(os.fstat(self._host_fd(fd)), buf)

    @syscall(4, "stat", "path ptr")
    def sys_stat(self, path, buf):
        return self._stat_path(self._resolve(AT_FDCWD, path), buf, nofollow=False)

    @syscall(6, "lstat", "path ptr")
    def sys_lstat(self, path, buf):
        return self._stat_path(self._resolve(AT_FDCWD, path), buf, nofollow=True)

    @syscall(262, "newfstatat", "dirfd path ptr hex")
    def sys_newfstatat(self, dirfd, path, buf, flags):
        if flags & AT_EMPTY_PATH and self.memory.read_cstring(path) == b"":
            return self.sys_fstat(dirfd, buf)
        return self._stat_path(self._resolve(dirfd, path), buf,
                               nofollow=bool(flags & AT_SYMLINK_NOFOLLOW))

    @syscall(16, "ioctl", "fd ioctl ptr")
    def sys_ioctl(self, fd, request, arg):
        guest_file = self.files.get(_signed32(fd))
        if request != TIOCGWINSZ or guest_file.entry.kind == FD_FILE:
            return -errno.ENOTTY
        self.memory.check(arg, 8)
        size = fcntl.ioctl(guest_file.host_fd, TIOCGWINSZ, bytes(8))
        self.memory.write(arg, size)
        return 0

    # -- memory ----------------------------------------------------------------------------

    @syscall(12, "brk", "ptr")
    def sys_brk(self, addr):
        return self.address_space.brk(addr)

    @syscall(9, "mmap", "ptr size prot mflags fd off")
    def sys_mmap(self, addr, length, prot, flags, fd, offset):
        host_fd = None if flags & MAP_ANONYMOUS else self._host_fd(fd)
        return self.address_space.mmap(addr, length, flags, host_fd, offset)

    @syscall(11, "munmap", "ptr size")
    def sys_munmap(self, addr, length):
        return self.address_space.munmap(addr, length)

    @syscall(10, "mprotect", "ptr size prot")
    def sys_mprotect(self, addr, length, prot):
        """Accepted but not enforced: all user memory stays readable and writable."""
        if not self.address_space.in_user_memory(addr, length):
            return -errno.ENOMEM
        return 0

    # -- process and CPU -------------------------------------------------------------------

    @syscall(158, "arch_prctl", "arch ptr")
    def sys_arch_prctl(self, code, addr):
        segment = {ARCH_SET_FS: "fs", ARCH_GET_FS: "fs", ARCH_SET_GS: "gs", ARCH_GET_GS: "gs"}
        if code not in segment:
            return -errno.EINVAL
        if code in (ARCH_SET_FS, ARCH_SET_GS):
            if not x86.is_canonical(addr):
                return -errno.EPERM
            self.cpu.set_segment_base(segment[code], addr)
        else:
            self.memory.write(addr, struct.pack("<Q", self.cpu.segment_base(segment[code])))
        return 0

    @syscall(218, "set_tid_address", "ptr")
    def sys_set_tid_address(self, addr):
        return GUEST_PID

    @syscall(39, "getpid")
    def sys_getpid(self):
        return GUEST_PID

    @syscall(186, "gettid")
    def sys_gettid(self):
        return GUEST_PID

    @syscall(228, "clock_gettime", "clock ptr")
    def sys_clock_gettime(self, clock, buf):
        try:
            now = time.clock_gettime_ns(_signed32(clock))
        except OSError:
            return -errno.EINVAL
        self.memory.write(buf, TIMESPEC.pack(*divmod(now, 10**9)))
        return 0

    @syscall(318, "getrandom", "out size hex")
    def sys_getrandom(self, buf, length, flags):
        data = os.urandom(min(length, GETRANDOM_MAX))
        self.memory.write(buf, data)
        return len(data)

    @syscall(60, "exit", "int")
    def sys_exit(self, status):
        raise GuestExit(status & 0xFF)

    @syscall(231, "exit_group", "int")
    def sys_exit_group(self, status):
        raise GuestExit(status & 0xFF)

    @syscall(SYSCALL_SAVE, "vmstate_save")
    def sys_save(self):
        if not self.save_enabled:
            return -errno.ENOSYS
        raise SaveRequested()
