"""Process system calls: identity of the one guest process, its exit, its CPU registers
(arch_prctl) and the lab's SAVE call."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from vmstate import x86

from . import signals
from .paths import PROC_SELF_EXE, error
from .stops import GuestExit, ContextReplaced, SaveRequested
from .table import signed32, syscall
from .trace import AT_FDCWD

ROBUST_LIST_HEAD_SIZE = 24
CLONE_VM, CLONE_VFORK, CLONE_THREAD = 0x100, 0x4000, 0x10000
CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x200000, 0x1000000
WNOHANG, WUNTRACED, WCONTINUED, __WALL = 1, 2, 8, 0x40000000
MAX_ARG_STRINGS, MAX_ARG_STRLEN = 1 << 16, 32 * 4096
PR_SET_CHILD_SUBREAPER = 36
MAX_ARG_TOTAL = 2 << 20           # argv + envp: a quarter of the default 8 MiB stack limit
RUSAGE_SIZE = 144
SHEBANG_MAX = 256
MAX_INTERPRETERS = 4
PR_SET_NAME, PR_GET_NAME = 15, 16
GETRANDOM_MAX = 1 << 25
ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
ARCH_REGISTERS = {ARCH_SET_FS: "fs_base", ARCH_GET_FS: "fs_base", ARCH_SET_GS: "gs_base",
                  ARCH_GET_GS: "gs_base"}
SYSCALL_SAVE = 400          # the ScratchVM lab's convention: the guest asks for a SAVE


@syscall(158, "arch_prctl", "arch ptr")
def sys_arch_prctl(k, code, addr):
    if code not in ARCH_REGISTERS:
        return -errno.EINVAL
    if code in (ARCH_SET_FS, ARCH_SET_GS):
        if not x86.is_canonical(addr):
            return -errno.EPERM
        k.cpu.write_register(ARCH_REGISTERS[code], addr)
    else:
        k.memory.write(addr, struct.pack("<Q", k.cpu.read_register(ARCH_REGISTERS[code])))
    return 0


@syscall(218, "set_tid_address", "ptr")
def sys_set_tid_address(k, addr):
    return k.pid


@syscall(39, "getpid")
def sys_getpid(k):
    return k.pid


@syscall(186, "gettid")
def sys_gettid(k):
    return k.pid


@syscall(110, "getppid")
def sys_getppid(k):
    return k.parent_pid


@syscall(111, "getpgrp")
def sys_getpgrp(k):
    return k.pid


@syscall(121, "getpgid", "int")
def sys_getpgid(k, pid):
    return k.pid


@syscall(124, "getsid", "int")
def sys_getsid(k, pid):
    return k.pid


@syscall(109, "setpgid", "int int")
def sys_setpgid(k, pid, pgid):
    return 0


@syscall(112, "setsid")
def sys_setsid(k):
    return -errno.EPERM


@syscall(273, "set_robust_list", "ptr size")
def sys_set_robust_list(k, head, length):
    return 0 if length == ROBUST_LIST_HEAD_SIZE else -errno.EINVAL


@syscall(157, "prctl", "int hex hex")
def sys_prctl(k, option, arg2, arg3):
    if option in (PR_SET_NAME, PR_GET_NAME):
        if option == PR_GET_NAME:
            k.memory.write(arg2, os.fsencode(os.path.basename(k.program))[:15].ljust(16, b"\0"))
        return 0
    return -errno.EINVAL


@syscall(57, "fork")
def sys_fork(k):
    return _fork(k)


@syscall(58, "vfork")
def sys_vfork(k):
    """A full copy, like fork (the parent does not wait for the child's exec; the guest cannot
    tell, as the child of a vfork may only exec or _exit)."""
    return _fork(k)


@syscall(56, "clone", "hex ptr ptr ptr hex")
def sys_clone(k, flags, stack, parent_tid, child_tid, tls):
    """Without CLONE_VM this is a fork (the exit signal in the low byte aside); threads are
    refused."""
    if flags & (CLONE_VM | CLONE_THREAD) and not flags & CLONE_VFORK:
        return -errno.ENOSYS
    if flags & ~(CLONE_VFORK | CLONE_VM | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | 0xFF):
        return -errno.EINVAL
    if stack and flags & CLONE_VFORK:
        return -errno.ENOSYS          # posix_spawn's vfork on a separate stack: not served
    return _fork(k)


def _fork(k) -> int:
    if len(k.children) >= k.max_children \
            or guest_process_count(k.root_host_pid) >= k.max_processes:
        return -errno.EAGAIN
    if os.getpid() == k.root_host_pid:
        _adopt_orphans()
    k.cpu.return_to_user(0)            # the state the child starts from
    child = k.cpu.fork()
    if child == 0:
        k.parent_pid, k.pid = k.pid, os.getpid()
        k.children = set()
        k.stop_fd = None               # a child is never saved on its own
        k.become_child_process()
        return 0
    k.children.add(child)
    return child


def _adopt_orphans() -> None:
    """Make the first guest process's VMM the subreaper of the guest's processes, so that one
    whose parent ended stays in its tree (and in guest_process_count)."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise error(ctypes.get_errno())


def guest_process_count(root_host_pid: int) -> int:
    """The live processes (zombies not counted) of one VM's tree: the VMM processes that
    descend from its first one, read from /proc. A fork costs one scan of /proc; nothing
    has to be returned when a process dies, however it dies."""
    parents, zombies = {}, set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue                            # it ended meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        if fields[0] == b"Z":
            zombies.add(pid)
    count = 0
    for pid in parents.keys() - zombies:
        ancestor = pid
        while ancestor > 1 and ancestor != root_host_pid:
            ancestor = parents.get(ancestor, 0)
        count += ancestor == root_host_pid
    return count


@syscall(59, "execve", "path ptr ptr")
def sys_execve(k, path, argv, envp):
    return _execve(k, AT_FDCWD, path, argv, envp, 0)


@syscall(322, "execveat", "dirfd path ptr ptr hex")
def sys_execveat(k, dirfd, path, argv, envp, flags):
    return _execve(k, dirfd, path, argv, envp, flags)


def _execve(k, dirfd, path, argv_addr, envp_addr, flags) -> int:
    guest_path = k.resolve(dirfd, path)
    # what a script's interpreter gets as the script's name: the path as given, as on Linux
    filename = k.path(path)
    if signed32(dirfd) != AT_FDCWD and not filename.startswith("/"):
        filename = f"/dev/fd/{signed32(dirfd)}/{filename}"
    argv = _string_array(k, argv_addr)
    envp = _string_array(k, envp_addr, MAX_ARG_TOTAL - _strings_size(argv))
    for _ in range(MAX_INTERPRETERS):
        host_fd = _open_executable(k, guest_path)
        try:
            interpreter = _script_interpreter(host_fd)
        except BaseException:
            os.close(host_fd)
            raise
        if interpreter is None:
            break
        os.close(host_fd)
        argv = [*interpreter, filename, *argv[1:]]
        guest_path, filename = k.namespace.absolute(interpreter[0]), interpreter[0]
    else:
        raise error(errno.ELOOP)
    try:
        host_path = k.program if guest_path == PROC_SELF_EXE else k.namespace.host_path(guest_path)
        k.address_space = k.cpu.exec(f"/proc/self/fd/{host_fd}", argv or [guest_path], envp)
        k.exec_program(host_fd, host_path)
    finally:
        os.close(host_fd)
    k.files.close_on_exec()
    handled = list(k.signals.actions)
    k.signals.reset_on_exec()
    for sig in handled:
        signals.mirror_on_host(k, sig)
    raise ContextReplaced()


def _open_executable(k, guest_path: str) -> int:
    """A host fd of a regular file the guest may execute, else EACCES: as Linux, a script
    itself must be executable, not only its interpreter."""
    if guest_path == PROC_SELF_EXE:          # the running program itself, wherever it lies
        host_fd = os.open(k.program_host_path(), os.O_RDONLY | os.O_CLOEXEC)
    else:
        host_fd = k.namespace.open(guest_path, os.O_RDONLY)
    if not stat.S_ISREG(os.fstat(host_fd).st_mode) \
            or not os.access(f"/proc/self/fd/{host_fd}", os.X_OK):
        os.close(host_fd)
        raise error(errno.EACCES)
    return host_fd


def _script_interpreter(host_fd: int) -> list[str] | None:
    """For a `#!` script, its interpreter and optional argument (as Linux splits the line)."""
    head = os.pread(host_fd, SHEBANG_MAX, 0)
    if not head.startswith(b"#!"):
        return None
    line = os.fsdecode(head[2:].split(b"\n")[0]).strip()
    if not line:
        raise error(errno.ENOEXEC)
    interpreter, _, argument = line.partition(" ")
    argument = argument.strip()
    return [interpreter, argument] if argument else [interpreter]


def _string_array(k, addr: int, room: int = MAX_ARG_TOTAL) -> list[str]:
    """A NULL-terminated array of strings in guest memory. E2BIG past MAX_ARG_STRINGS
    strings or `room` bytes in all (pointers and terminating NULs counted, as Linux counts
    them against its limit of a quarter of the stack), so a guest cannot make the VMM hold
    more than that."""
    if not addr:
        return []
    strings = []
    while len(strings) < MAX_ARG_STRINGS:
        pointer = int.from_bytes(k.memory.read(addr + 8 * len(strings), 8), "little")
        if not pointer:
            return strings
        raw = k.memory.read_cstring(pointer, MAX_ARG_STRLEN)
        room -= len(raw) + 1 + 8
        if room < 0:
            break
        strings.append(os.fsdecode(raw))
    raise error(errno.E2BIG)


def _strings_size(strings: list[str]) -> int:
    return sum(len(os.fsencode(text)) + 1 + 8 for text in strings)


@syscall(61, "wait4", "int ptr hex ptr")
def sys_wait4(k, pid, status_addr, options, rusage):
    pid = signed32(pid)
    if options & ~(WNOHANG | WUNTRACED | WCONTINUED | __WALL):
        return -errno.EINVAL
    if not k.children or (pid > 0 and pid not in k.children):
        return -errno.ECHILD
    child, status = os.waitpid(pid if pid > 0 else -1, options & (WNOHANG | WUNTRACED |
                                                                 WCONTINUED))
    if child == 0:
        return 0
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        k.children.discard(child)
        k.signals.reported_children.discard(child)
    if status_addr:
        k.memory.write(status_addr, struct.pack("<i", status))
    if rusage:
        k.memory.write(rusage, bytes(RUSAGE_SIZE))
    return child


@syscall(318, "getrandom", "out size hex")
def sys_getrandom(k, buf, length, flags):
    data = os.urandom(min(length, GETRANDOM_MAX))
    k.memory.write(buf, data)
    return len(data)


@syscall(60, "exit", "int")
def sys_exit(k, status):
    raise GuestExit(status & 0xFF)


@syscall(231, "exit_group", "int")
def sys_exit_group(k, status):
    raise GuestExit(status & 0xFF)


@syscall(SYSCALL_SAVE, "vmstate_save")
def sys_save(k):
    if not k.save_enabled:
        return -errno.ENOSYS
    raise SaveRequested()
