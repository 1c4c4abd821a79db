"""Memory system calls: brk, mmap, munmap, mprotect (over the UserAddressSpace)."""

from __future__ import annotations

import errno

from .address_space import MAP_ANONYMOUS
from .table import syscall


@syscall(12, "brk", "ptr")
def sys_brk(k, addr):
    return k.address_space.brk(addr)


@syscall(9, "mmap", "ptr size prot mflags fd off")
def sys_mmap(k, addr, length, prot, flags, fd, offset):
    host_fd = None if flags & MAP_ANONYMOUS else k.host_fd(fd)
    return k.address_space.mmap(addr, length, flags, host_fd, offset)


@syscall(11, "munmap", "ptr size")
def sys_munmap(k, addr, length):
    return k.address_space.munmap(addr, length)


@syscall(10, "mprotect", "ptr size prot")
def sys_mprotect(k, addr, length, prot):
    """Accepted but not enforced: all user memory stays readable and writable."""
    if not k.address_space.in_user_memory(addr, length):
        return -errno.ENOMEM
    return 0
