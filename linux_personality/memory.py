"""Memory system calls: brk, mmap, munmap, mremap, madvise, mprotect (over the
UserAddressSpace)."""

from __future__ import annotations

import errno

from vmstate.state import PAGE_SIZE

from .address_space import MAP_ANONYMOUS, page_up
from .table import syscall

MREMAP_MAYMOVE = 1
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PROT_GROWS = 0x03000000                  # PROT_GROWSDOWN | PROT_GROWSUP: accepted, no effect
MADV_DONTNEED = 4


@syscall(12, "brk", "ptr")
def sys_brk(k, addr):
    return k.address_space.brk(addr)


@syscall(9, "mmap", "ptr size prot mflags fd off")
def sys_mmap(k, addr, length, prot, flags, fd, offset):
    """The memory handed out gets `prot` (PROT_NONE: a reservation that faults on access)."""
    host_fd = None if flags & MAP_ANONYMOUS else k.host_fd(fd)
    start = k.address_space.mmap(addr, length, flags, host_fd, offset)
    if start >= 0:
        k.cpu.protect(start, page_up(length), prot)
    return start


@syscall(11, "munmap", "ptr size")
def sys_munmap(k, addr, length):
    return k.address_space.munmap(addr, length)


@syscall(10, "mprotect", "ptr size prot")
def sys_mprotect(k, addr, length, prot):
    """Enforced by the CPU backend's page tables (read-only, or no access for PROT_NONE)."""
    if addr % PAGE_SIZE or prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_GROWS):
        return -errno.EINVAL
    length = page_up(length)
    if not k.address_space.in_user_memory(addr, length):
        return -errno.ENOMEM
    if length:
        k.cpu.protect(addr, length, prot)
    return 0


@syscall(25, "mremap", "ptr size size hex ptr")
def sys_mremap(k, addr, old_length, new_length, flags, new_addr):
    if flags & ~MREMAP_MAYMOVE:
        return -errno.EINVAL
    return k.address_space.mremap(addr, old_length, new_length, bool(flags & MREMAP_MAYMOVE))


@syscall(28, "madvise", "ptr size int")
def sys_madvise(k, addr, length, advice):
    """MADV_DONTNEED zeroes private anonymous memory, as on Linux; other advice is taken."""
    if addr % PAGE_SIZE:
        return -errno.EINVAL
    length = page_up(length)
    if not k.address_space.in_user_memory(addr, length):
        return -errno.ENOMEM
    if advice == MADV_DONTNEED and length:
        k.memory.zero(addr, length)
    return 0
