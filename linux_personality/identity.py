"""Identity and limits: one user, one host name, resource limits, system information.

The guest runs as the VMM's own user (so `id` and file owners agree with the host's view of
the files it makes); set*id calls succeed only for the identity it already has, as for an
unprivileged process that asks for nothing new.
"""

from __future__ import annotations

import errno
import os
import resource
import struct
import time
from dataclasses import dataclass, field

from .paths import error
from .table import signed32, syscall

UTS_FIELD = 65
HOST_NAME_MAX = 64
RLIM_INFINITY = 2**64 - 1
RLIMIT = struct.Struct("<QQ")
RLIMIT_FSIZE, RLIMIT_NOFILE, RLIM_NLIMITS = 1, 7, 16
SYSINFO = struct.Struct("<q3Q6QH6xQQI4x")
RUSAGE = struct.Struct("<qqqq14q")
CPU_MASK_BYTES = 8


@dataclass
class Identity:
    """Who the guest is: its host name, user and group ids, and resource limits."""
    hostname: str = "vmstate"
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    limits: dict[int, tuple[int, int]] = field(default_factory=dict)


def _uts(text: str) -> bytes:
    return os.fsencode(text)[:UTS_FIELD - 1].ljust(UTS_FIELD, b"\0")


@syscall(63, "uname", "ptr")
def sys_uname(k, buf):
    host = os.uname()
    k.memory.write(buf, b"".join(_uts(text) for text in (
        "Linux", k.identity.hostname, host.release, host.version, "x86_64", "(none)")))
    return 0


@syscall(170, "sethostname", "ptr size")
def sys_sethostname(k, name, length):
    if not 0 <= signed32(length) <= HOST_NAME_MAX:
        raise error(errno.EINVAL)
    k.identity.hostname = os.fsdecode(k.memory.read(name, length))
    return 0


def _ids(k) -> tuple[int, int]:
    return k.identity.uid, k.identity.gid


@syscall(102, "getuid")
def sys_getuid(k):
    return k.identity.uid


@syscall(107, "geteuid")
def sys_geteuid(k):
    return k.identity.uid


@syscall(104, "getgid")
def sys_getgid(k):
    return k.identity.gid


@syscall(108, "getegid")
def sys_getegid(k):
    return k.identity.gid


def _write_ids(k, addrs, value: int) -> int:
    for addr in addrs:
        k.memory.write(addr, struct.pack("<I", value))
    return 0


@syscall(118, "getresuid", "ptr ptr ptr")
def sys_getresuid(k, r, e, s):
    return _write_ids(k, (r, e, s), k.identity.uid)


@syscall(120, "getresgid", "ptr ptr ptr")
def sys_getresgid(k, r, e, s):
    return _write_ids(k, (r, e, s), k.identity.gid)


def _set_ids(current: int, *wanted: int) -> int:
    """One identity per VM: asking for it (or -1, "unchanged") succeeds, anything else EPERM."""
    if all(signed32(w) in (-1, current) for w in wanted):
        return 0
    raise error(errno.EPERM)


@syscall(105, "setuid", "int")
def sys_setuid(k, uid):
    return _set_ids(k.identity.uid, uid)


@syscall(106, "setgid", "int")
def sys_setgid(k, gid):
    return _set_ids(k.identity.gid, gid)


@syscall(113, "setreuid", "int int")
def sys_setreuid(k, r, e):
    return _set_ids(k.identity.uid, r, e)


@syscall(114, "setregid", "int int")
def sys_setregid(k, r, e):
    return _set_ids(k.identity.gid, r, e)


@syscall(117, "setresuid", "int int int")
def sys_setresuid(k, r, e, s):
    return _set_ids(k.identity.uid, r, e, s)


@syscall(119, "setresgid", "int int int")
def sys_setresgid(k, r, e, s):
    return _set_ids(k.identity.gid, r, e, s)


@syscall(122, "setfsuid", "int")
def sys_setfsuid(k, uid):
    return k.identity.uid


@syscall(123, "setfsgid", "int")
def sys_setfsgid(k, gid):
    return k.identity.gid


@syscall(115, "getgroups", "int ptr")
def sys_getgroups(k, size, buf):
    """The VMM's own supplementary groups."""
    size, groups = signed32(size), os.getgroups()
    if size < 0 or 0 < size < len(groups):
        raise error(errno.EINVAL)
    if size and groups:
        k.memory.write(buf, struct.pack(f"<{len(groups)}I", *groups))
    return len(groups)


@syscall(116, "setgroups", "int ptr")
def sys_setgroups(k, size, buf):
    groups = struct.unpack(f"<{size}I", k.memory.read(buf, 4 * size)) if 0 < size <= 64 else ()
    if sorted(groups) != sorted(os.getgroups()):
        raise error(errno.EPERM)
    return 0


def rlimit(k, resource_nr: int) -> tuple[int, int]:
    if resource_nr in k.identity.limits:
        return k.identity.limits[resource_nr]
    if resource_nr == RLIMIT_NOFILE:
        return k.files.max_fds, k.files.max_fds
    if resource_nr == RLIMIT_FSIZE and k.max_file_size is not None:
        return k.max_file_size, k.max_file_size
    soft, hard = resource.getrlimit(resource_nr)
    return soft % 2**64, hard % 2**64


def _prlimit(k, resource_nr: int, new: int, old: int) -> int:
    if not 0 <= resource_nr < RLIM_NLIMITS:
        raise error(errno.EINVAL)
    current = rlimit(k, resource_nr)
    if new:
        soft, hard = RLIMIT.unpack(k.memory.read(new, RLIMIT.size))
        if soft > hard or hard > current[1]:
            raise error(errno.EINVAL if soft > hard else errno.EPERM)
    if old:
        k.memory.write(old, RLIMIT.pack(*current))
    if new:
        k.identity.limits[resource_nr] = (soft, hard)
    return 0


@syscall(97, "getrlimit", "int ptr")
def sys_getrlimit(k, resource_nr, buf):
    return _prlimit(k, resource_nr, 0, buf)


@syscall(160, "setrlimit", "int ptr")
def sys_setrlimit(k, resource_nr, buf):
    return _prlimit(k, resource_nr, buf, 0)


@syscall(302, "prlimit64", "int int ptr ptr")
def sys_prlimit64(k, pid, resource_nr, new, old):
    if signed32(pid) not in (0, k.pid):
        raise error(errno.ESRCH)
    return _prlimit(k, resource_nr, new, old)


@syscall(99, "sysinfo", "ptr")
def sys_sysinfo(k, buf):
    size = k.memory.user_end
    uptime = int(time.clock_gettime(time.CLOCK_BOOTTIME))
    k.memory.write(buf, SYSINFO.pack(uptime, 0, 0, 0, size, size // 2, 0, 0, 0, 0, 1, 0, 0, 1))
    return 0


@syscall(98, "getrusage", "int ptr")
def sys_getrusage(k, who, buf):
    if signed32(who) not in (0, -1, 1):      # RUSAGE_SELF, RUSAGE_CHILDREN, RUSAGE_THREAD
        raise error(errno.EINVAL)
    used = resource.getrusage(resource.RUSAGE_SELF if signed32(who) != -1
                              else resource.RUSAGE_CHILDREN)
    fields = [int(used.ru_utime), int(used.ru_utime % 1 * 1e6),
              int(used.ru_stime), int(used.ru_stime % 1 * 1e6)] + [0] * 14
    k.memory.write(buf, RUSAGE.pack(*fields))
    return 0


@syscall(204, "sched_getaffinity", "int size ptr")
def sys_sched_getaffinity(k, pid, size, buf):
    """One CPU: the guest has one vCPU."""
    if size < CPU_MASK_BYTES or size % 8:
        raise error(errno.EINVAL)
    k.memory.write(buf, (1).to_bytes(CPU_MASK_BYTES, "little"))
    return CPU_MASK_BYTES


@syscall(309, "getcpu", "ptr ptr ptr")
def sys_getcpu(k, cpu, node, cache):
    """CPU 0 on node 0: the guest has one vCPU. Either pointer may be NULL."""
    for addr in (cpu, node):
        if addr:
            k.memory.write(addr, bytes(4))
    return 0


@syscall(203, "sched_setaffinity", "int size ptr")
def sys_sched_setaffinity(k, pid, size, buf):
    return 0


@syscall(24, "sched_yield")
def sys_sched_yield(k):
    return 0


@syscall(140, "getpriority", "int int")
def sys_getpriority(k, which, who):
    return 20


@syscall(141, "setpriority", "int int int")
def sys_setpriority(k, which, who, prio):
    return 0
