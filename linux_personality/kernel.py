"""The Personality: serves one guest's system calls through a Cpu (see cpu.py).

Handlers live in one module per subsystem and register themselves in table.SYSCALLS; this
module holds the state they share and the dispatch. Guest pointers are checked by the
GuestMemory (a bad one gives -EFAULT); host errors become -errno; anything not registered
returns -ENOSYS (and shows in --trace).
"""

from __future__ import annotations

import errno
import os
import select
import struct

from vmstate.rootfs import normalize_guest_path, open_beneath
from vmstate.state import FD_FILE, FD_STDIN

from .address_space import UserAddressSpace
from .cpu import SYSCALL_ARG_REGISTERS, Cpu, GuestFault, GuestMemory
from .fdtable import FileTable
from .stops import CallInterrupted
from .table import SYSCALLS, Syscall, signed32
from .trace import AT_FDCWD, format_call

IOV_MAX = 1024
IOVEC = struct.Struct("<QQ")
STAT = struct.Struct("<QQQIIIIQqqqQQQQQQ24x")       # struct stat, x86-64 (144 bytes)


class Personality:
    def __init__(self, cpu: Cpu, files: FileTable, address_space: UserAddressSpace, *,
                 trace=None, stop_fd: int | None = None, save_enabled: bool = False):
        self.cpu = cpu
        self.memory: GuestMemory = cpu.memory
        self.files = files
        self.address_space = address_space
        self.trace = trace
        self.stop_fd = stop_fd
        self.save_enabled = save_enabled

    def serve(self) -> None:
        """Serve the system call the CPU stopped on and return to the guest. GuestExit,
        SaveRequested and CallInterrupted propagate: those calls do not return (now)."""
        nr = self.cpu.read_register("rax")
        args = tuple(self.cpu.read_register(name) for name in SYSCALL_ARG_REGISTERS)
        self.cpu.return_to_user(self.dispatch(nr, args))

    def dispatch(self, nr: int, args: tuple[int, ...]) -> int:
        """The call's result for RAX."""
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

    # -- helpers the subsystems share ------------------------------------------------------

    def host_fd(self, fd: int) -> int:
        return self.files.get(signed32(fd)).host_fd

    def wait_readable(self, fd: int) -> None:
        """Block until guest fd `fd` can be read, unless the host asks the VM to stop."""
        guest_file = self.files.get(signed32(fd))
        if self.stop_fd is None or guest_file.entry.kind != FD_STDIN:
            return
        ready, _, _ = select.select([guest_file.host_fd, self.stop_fd], [], [])
        if self.stop_fd in ready:
            raise CallInterrupted()

    def iovecs(self, addr: int, count: int, *, writable: bool) -> list[memoryview]:
        if not 0 <= count <= IOV_MAX:
            raise OSError(errno.EINVAL, "bad iovec count")
        views = []
        for base, length in IOVEC.iter_unpack(self.memory.read(addr, IOVEC.size * count)):
            views.append(self.memory.user_view(base, length))
            if writable:
                self.memory.mark_written(base, length)
        return views

    def resolve(self, dirfd: int, path_addr: int) -> str:
        path = os.fsdecode(self.memory.read_cstring(path_addr))
        if signed32(dirfd) != AT_FDCWD and not path.startswith("/"):
            directory = self.files.get(signed32(dirfd)).entry
            if directory.kind != FD_FILE:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            path = f"{directory.path}/{path}"
        return path

    def write_stat(self, st: os.stat_result, addr: int) -> int:
        self.memory.write(addr, STAT.pack(
            st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, int(st.st_atime), st.st_atime_ns % 10**9,
            int(st.st_mtime), st.st_mtime_ns % 10**9, int(st.st_ctime), st.st_ctime_ns % 10**9))
        return 0

    def stat_path(self, path: str, addr: int, nofollow: bool) -> int:
        flags = os.O_PATH | (os.O_NOFOLLOW if nofollow else 0)
        host_fd = open_beneath(self.files.root_fd, normalize_guest_path(path), flags, 0)
        try:
            return self.write_stat(os.fstat(host_fd), addr)
        finally:
            os.close(host_fd)
