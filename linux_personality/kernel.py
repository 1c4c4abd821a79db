"""The Personality: serves one guest's system calls through a Cpu (see cpu.py).

Handlers live in one module per subsystem and register themselves in table.SYSCALLS; this
module holds the state they share and the dispatch. Guest pointers are checked by the
GuestMemory (a bad one gives -EFAULT); host errors become -errno; anything not registered
returns -ENOSYS (and shows in --trace).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct

from vmstate.fd import drain
from vmstate.state import DEFAULT_MAX_PROCESSES, FD_FILE

from .address_space import UserAddressSpace
from .cpu import SYSCALL_ARG_REGISTERS, Cpu, GuestFault, GuestMemory
from .fdtable import FD_PIPE, FileTable
from .identity import Identity
from . import signals
from .signals import SignalState
from .paths import PATH_MAX, error
from .stops import CallInterrupted, ContextReplaced
from .table import SYSCALLS, Syscall, signed32
from .trace import AT_FDCWD, format_call

GUEST_PID = 1
MAX_CHILDREN = 64            # children one guest process may have at a time (EAGAIN past it)
IOV_MAX = 1024
IOVEC = struct.Struct("<QQ")
STAT = struct.Struct("<QQQIIIIQqqqQQQQQQ24x")       # struct stat, x86-64 (144 bytes)


class Personality:
    def __init__(self, cpu: Cpu, files: FileTable, address_space: UserAddressSpace, *,
                 program: str = "", trace=None, stop_fd: int | None = None,
                 save_enabled: bool = False, max_file_size: int | None = None,
                 max_processes: int = DEFAULT_MAX_PROCESSES, sleep_left_ns: int | None = None,
                 identity: Identity | None = None, signals: SignalState | None = None,
                 reserved_signals=()):
        self.cpu = cpu
        self.files = files
        self.namespace = files.namespace
        self.program = program
        self.program_fd = self._open_program()
        self.pid, self.parent_pid = GUEST_PID, 0
        self.root_pid, self.root_host_pid = GUEST_PID, os.getpid()   # the first process
        self.identity = identity or Identity()
        self.signals = signals or SignalState()
        self.max_file_size = max_file_size
        self.children: set[int] = set()          # host pids of forked guest processes
        self.reserved_signals = frozenset(reserved_signals)   # host signals the VMM uses
        self.signal_wake_fd, self._signal_wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._mirror_handlers()
        self.max_children = MAX_CHILDREN
        self.max_processes = max_processes      # in the VM's whole process tree
        # What an interrupted relative sleep had left (clock._sleep_for), for its re-issue:
        # the next call served (resumed_sleep_ns while it runs).
        self.sleep_left_ns, self.resumed_sleep_ns = sleep_left_ns, None
        self.memory: GuestMemory = cpu.memory
        self.address_space = address_space
        self.trace = trace
        self.stop_fd = stop_fd
        self.save_enabled = save_enabled

    def serve(self) -> None:
        """Serve the system call the CPU stopped on and return to the guest. GuestExit,
        SaveRequested and CallInterrupted propagate: those calls do not return (now)."""
        nr = self.cpu.read_register("rax")
        args = tuple(self.cpu.read_register(name) for name in SYSCALL_ARG_REGISTERS)
        try:
            result = self.dispatch(nr, args)
        except ContextReplaced:
            return
        signals.check_events(self)
        sig = self.signals.deliverable()
        if sig:
            signals.deliver(self, sig, result)
        else:
            self.cpu.return_to_user(result)

    def dispatch(self, nr: int, args: tuple[int, ...]) -> int:
        """The call's result for RAX."""
        self.resumed_sleep_ns, self.sleep_left_ns = self.sleep_left_ns, None
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
            if e.errno == errno.EPIPE:         # a write to a pipe nobody reads: SIGPIPE
                signals.send_to_self(self, signals.SIGPIPE)
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
        """Block until guest fd `fd` can be read, unless the host asks the VM to stop (then
        the call is re-issued after the save: the guest sees no EINTR)."""
        guest_file = self.files.get(signed32(fd))
        if self.stop_fd is None or not guest_file.may_block:
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

    def path(self, addr: int) -> str:
        """A path argument: -EFAULT if unreadable, -ENAMETOOLONG past PATH_MAX."""
        try:
            return os.fsdecode(self.memory.read_cstring(addr, PATH_MAX))
        except GuestFault:
            self.memory.check(addr, PATH_MAX)
            raise error(errno.ENAMETOOLONG) from None

    def directory_path(self, dirfd: int) -> str:
        """The guest path of the directory a *at call's dirfd names (AT_FDCWD: the cwd)."""
        if signed32(dirfd) == AT_FDCWD:
            return self.namespace.cwd
        guest_file = self.files.get(signed32(dirfd))
        if guest_file.entry.kind != FD_FILE or not stat.S_ISDIR(os.fstat(guest_file.host_fd).st_mode):
            raise error(errno.ENOTDIR)
        path = guest_file.entry.path
        return "/" if path == "." else "/" + path

    def resolve(self, dirfd: int, path_addr: int) -> str:
        """The absolute guest path named by (dirfd, path)."""
        path = self.path(path_addr)
        base = None if path.startswith("/") else self.directory_path(dirfd)
        return self.namespace.absolute(path, base)

    def write_stat(self, st: os.stat_result, addr: int) -> int:
        self.memory.write(addr, STAT.pack(
            st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, int(st.st_atime), st.st_atime_ns % 10**9,
            int(st.st_mtime), st.st_mtime_ns % 10**9, int(st.st_ctime), st.st_ctime_ns % 10**9))
        return 0

    def stat_path(self, path: str, nofollow: bool) -> os.stat_result:
        host_fd = self.namespace.open(path, os.O_PATH | (os.O_NOFOLLOW if nofollow else 0))
        try:
            return os.fstat(host_fd)
        finally:
            os.close(host_fd)

    def limit_file_size(self, host_fd: int, data, offset: int | None = None):
        """`data` cut to what --max-file-size lets a write at `offset` (default: the fd's
        position) put in the file; EFBIG if nothing fits, as with RLIMIT_FSIZE."""
        return data[:self.file_size_room(host_fd, len(data), offset)]

    def file_size_room(self, host_fd: int, length: int, offset: int | None = None) -> int:
        """How many of `length` bytes --max-file-size lets a write at `offset` (default: the
        fd's position) put in the file; EFBIG if none fits, as with RLIMIT_FSIZE."""
        if self.max_file_size is None:
            return length
        mode = os.fstat(host_fd)
        if not stat.S_ISREG(mode.st_mode):
            return length
        if offset is None:
            appending = fcntl.fcntl(host_fd, fcntl.F_GETFL) & os.O_APPEND
            offset = mode.st_size if appending else os.lseek(host_fd, 0, os.SEEK_CUR)
        room = self.max_file_size - offset
        if room <= 0 and length:
            raise error(errno.EFBIG)
        return min(max(room, 0), length)

    def _open_program(self) -> int | None:
        """An O_PATH fd of the program, what /proc/self/exe names for as long as it runs.
        Taken before the guest runs, and a program under the root is resolved inside it, so
        a symlink the guest puts in its place cannot lead /proc/self/exe out of the root.
        None if the program cannot be found (/proc/self/exe is then ENOENT)."""
        if not self.program:
            return None
        host_path = os.path.abspath(self.program)
        inside = self.namespace.guest_path_of(host_path)
        try:
            if inside is not None:
                return self.namespace.open(inside, os.O_PATH)
            return os.open(host_path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return None

    def exec_program(self, host_fd: int, host_path: str) -> None:
        """After execve: the new program is `host_fd` (resolved inside the root)."""
        if self.program_fd is not None:
            os.close(self.program_fd)
        self.program_fd = os.open(f"/proc/self/fd/{host_fd}", os.O_PATH | os.O_CLOEXEC)
        self.program = host_path

    def program_host_path(self) -> str:
        """A host path of the program itself (/proc/self/fd/N of its O_PATH fd)."""
        if self.program_fd is None:
            raise OSError(errno.ENOENT, "the program is gone")
        return f"/proc/self/fd/{self.program_fd}"

    def program_guest_path(self) -> str:
        """/proc/self/exe: the program's path in the guest's namespace, if it lies inside the
        root, else only its name under / (a host path outside the root is never shown)."""
        inside = None if self.program_fd is None else self.namespace.guest_path(self.program_fd)
        return inside or "/" + os.path.basename(self.program)

    def fd_guest_path(self, fd: int) -> str:
        guest_file = self.files.get(fd)
        entry = guest_file.entry
        if entry.kind == FD_FILE:
            return "/" if entry.path == "." else "/" + entry.path
        if entry.kind == FD_PIPE:
            return f"pipe:[{os.fstat(guest_file.host_fd).st_ino}]"
        return os.readlink(f"/proc/self/fd/{guest_file.host_fd}")

    def host_signal(self, sig: int) -> None:
        """A signal another guest process sent to this one (through its VMM): pending for the
        guest's handler; a wait in progress wakes up."""
        self.signals.pending |= 1 << (sig - 1)
        try:
            os.write(self._signal_wake_w, b"x")
        except BlockingIOError:
            pass

    def become_child_process(self) -> None:
        """After a fork, in the child: a wake-up pipe of its own, and the guest's handlers on
        every signal (the parent's VMM kept some for itself)."""
        self._close_wake_pipe()
        self.signal_wake_fd, self._signal_wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.reserved_signals = frozenset()
        self._mirror_handlers()

    def _mirror_handlers(self) -> None:
        for sig in self.signals.actions:
            signals.mirror_on_host(self, sig)

    def drain_signal_wake(self) -> None:
        drain(self.signal_wake_fd)

    def close(self) -> None:
        self._close_wake_pipe()
        if self.program_fd is not None:
            os.close(self.program_fd)
            self.program_fd = None

    def _close_wake_pipe(self) -> None:
        os.close(self.signal_wake_fd)
        os.close(self._signal_wake_w)
