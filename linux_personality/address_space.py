"""The guest's user address space as the VMM hands it out: program break and mmap area.

    user_start .. program .. brk_start ->heap->brk  ...  mmap_low <-mmap area- mmap_top | guard | stack
                                                                                           user_end

Memory is identity-mapped and present from boot, so brk and mmap only move bookkeeping.
Fresh memory is zero; memory handed out a second time (munmap'ed, or below a lowered brk)
is zeroed first, as Linux guarantees for anonymous memory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace

from vmstate.state import PAGE_SIZE, AddressSpace

from .cpu import GuestMemory

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
DEFAULT_STACK_SIZE = 8 << 20


def page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class UserAddressSpace:
    def __init__(self, state: AddressSpace, memory: GuestMemory):
        self.state = state
        self.memory = memory

    @classmethod
    def fresh(cls, memory: GuestMemory, user_start: int, heap_start: int,
              user_end: int) -> UserAddressSpace:
        stack_size = min(DEFAULT_STACK_SIZE, user_end // 8)
        top = user_end - stack_size - PAGE_SIZE          # the guard page lies at `top`
        return cls(AddressSpace(user_start=user_start, user_end=user_end, brk_start=heap_start,
                                brk=heap_start, mmap_low=top, mmap_top=top), memory)

    @property
    def stack_top(self) -> int:
        return self.state.user_end

    @property
    def guard_page(self) -> int:
        """The page between the mmap area and the stack, which a CPU backend leaves unmapped
        (a stack overflow faults there)."""
        return self.state.mmap_top

    def brk(self, requested: int) -> int:
        s = self.state
        if s.brk_start <= requested <= s.mmap_low:
            if requested < s.brk:
                self.memory.zero(requested, s.brk - requested)
            self.state = replace(s, brk=requested)
        return self.state.brk

    def mmap(self, addr: int, length: int, flags: int, host_fd: int | None, offset: int) -> int:
        """Returns the address, or a negative errno. Only anonymous and private file mappings
        (a shared anonymous mapping is private too: one process sees it)."""
        if length <= 0 or length >= 1 << 47 or offset % PAGE_SIZE:
            return -errno.EINVAL
        if not flags & MAP_ANONYMOUS and (flags & MAP_SHARED or host_fd is None):
            return -errno.ENODEV if host_fd is not None else -errno.EBADF
        size = page_up(length)
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            start = self._take_fixed_range(addr, size)
            if start < 0:
                return start
        else:
            start = self._take_free_range(size)
        if start is None:
            start = self.state.mmap_low - size
            if start < page_up(self.state.brk):
                return -errno.ENOMEM
            self.state = replace(self.state, mmap_low=start)
        if host_fd is not None and not flags & MAP_ANONYMOUS:
            view = self.memory.user_view(start, length)
            read = os.preadv(host_fd, [view], offset)
            self.memory.mark_written(start, read)
        return start

    def _take_free_range(self, size: int) -> int | None:
        """First fit from the ranges freed by munmap; the memory is zeroed before reuse."""
        ranges = list(self.state.free_ranges)
        for i, (start, length) in enumerate(ranges):
            if length >= size:
                ranges[i:i + 1] = [(start, length - size)] if length > size else []
                self.state = replace(self.state, free_ranges=tuple(ranges))
                taken = start + length - size
                self.memory.zero(taken, size)
                return taken
        return None

    def _take_fixed_range(self, addr: int, size: int) -> int:
        """MAP_FIXED: the range must lie in user memory above the break; it is handed out
        zeroed, and the mmap area grows down to it if it lies below."""
        s = self.state
        if addr % PAGE_SIZE:
            return -errno.EINVAL
        if addr < page_up(s.brk) or addr + size > s.mmap_top:
            return -errno.ENOMEM
        self.memory.zero(addr, size)
        self.state = replace(s, mmap_low=min(s.mmap_low, addr),
                             free_ranges=_remove_range(s.free_ranges, addr, size))
        return addr

    def mremap(self, addr: int, old_length: int, new_length: int, may_move: bool) -> int:
        """Shrink in place, or grow by moving (the contents copied, the old range freed)."""
        old_size, new_size = page_up(old_length), page_up(new_length)
        if addr % PAGE_SIZE or new_size == 0:
            return -errno.EINVAL
        if not self.in_user_memory(addr, old_size):
            return -errno.EFAULT
        if new_size <= old_size:
            if new_size < old_size:
                self.munmap(addr + new_size, old_size - new_size)
            return addr
        if not may_move:
            return -errno.ENOMEM
        new = self.mmap(0, new_size, MAP_PRIVATE | MAP_ANONYMOUS, None, 0)
        if new < 0:
            return new
        self.memory.write(new, self.memory.read(addr, old_size))
        self.munmap(addr, old_size)
        return new

    def munmap(self, addr: int, length: int) -> int:
        s = self.state
        size = page_up(length)
        if addr % PAGE_SIZE or length <= 0 or addr + size > 1 << 64:
            return -errno.EINVAL
        if addr < s.mmap_low or addr + size > s.mmap_top:
            return 0    # Linux accepts unmapping what is not mapped
        self.state = replace(s, free_ranges=_insert_range(s.free_ranges, addr, size))
        return 0

    def in_user_memory(self, addr: int, length: int) -> bool:
        return self.state.user_start <= addr and addr + length <= self.state.user_end


def _insert_range(ranges, addr: int, size: int) -> tuple[tuple[int, int], ...]:
    """Add [addr, addr+size) to a sorted list of free ranges, merging overlaps and neighbours."""
    merged: list[list[int]] = []
    for start, length in sorted([*ranges, (addr, size)]):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + length - merged[-1][0])
        else:
            merged.append([start, length])
    return tuple((start, length) for start, length in merged)


def _remove_range(ranges, addr: int, size: int) -> tuple[tuple[int, int], ...]:
    """Take [addr, addr+size) out of a list of free ranges."""
    left = []
    for start, length in ranges:
        end = start + length
        if end <= addr or start >= addr + size:
            left.append((start, length))
            continue
        if start < addr:
            left.append((start, addr - start))
        if end > addr + size:
            left.append((addr + size, end - addr - size))
    return tuple(left)
