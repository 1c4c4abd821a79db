"""Walk x86-64 4-level page tables in a memory image (no KVM): translate guest virtual
addresses and list the guest's mappings."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from . import x86
from .errors import VmstateError

PTE_P, PTE_RW, PTE_US, PTE_PS = 0x1, 0x2, 0x4, 0x80
NX = 1 << 63
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
LEVEL_SHIFTS = (39, 30, 21, 12)         # PML4, PDPT, PD, PT
TABLE = struct.Struct("<512Q")
MAX_LEAVES = 1 << 20

ReadPhys = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Mapping:
    """`size` bytes of virtual memory at `virtual` mapped to physical `physical`."""
    virtual: int
    physical: int
    size: int
    writable: bool
    user: bool
    executable: bool


def clip(m: Mapping, address: int, length: int) -> Mapping | None:
    """The part of `m` whose physical side lies in [address, address + length), if any."""
    start, end = max(m.physical, address), min(m.physical + m.size, address + length)
    if start >= end:
        return None
    return Mapping(m.virtual + start - m.physical, start, end - start, m.writable, m.user,
                   m.executable)


def _canonical(address: int) -> int:
    """Sign-extend bit 47, as the CPU does for the upper half of the address space."""
    return address | 0xFFFF_0000_0000_0000 if address & (1 << 47) else address


class PageTables:
    def __init__(self, read_phys: ReadPhys, cr3: int, cr0: int, cr4: int, efer: int):
        if not cr0 & x86.CR0_PG or not efer & x86.EFER_LMA:
            raise VmstateError("the vCPU is not in long mode with paging (CR0.PG, EFER.LMA)")
        if cr4 & x86.CR4_LA57:
            raise VmstateError("5-level paging (CR4.LA57) is not supported")
        self.read_phys = read_phys
        self.root = cr3 & ADDRESS_MASK

    def _table(self, physical: int) -> tuple[int, ...] | None:
        try:
            return TABLE.unpack(self.read_phys(physical, TABLE.size))
        except (VmstateError, ValueError, struct.error):
            return None          # a table outside memory maps nothing

    def translate(self, virtual: int) -> int | None:
        """The physical address of `virtual`, or None if it is not mapped."""
        table = self.root
        for level, shift in enumerate(LEVEL_SHIFTS):
            entries = self._table(table)
            if entries is None:
                return None
            entry = entries[(virtual >> shift) & 0x1FF]
            if not entry & PTE_P:
                return None
            if entry & PTE_PS and level in (1, 2) or level == 3:
                page_mask = (1 << shift) - 1
                return (entry & ADDRESS_MASK & ~page_mask) | (virtual & page_mask)
            table = entry & ADDRESS_MASK
        return None

    def mappings(self, max_leaves: int = MAX_LEAVES) -> Iterator[Mapping]:
        """Every present leaf mapping, in virtual address order; adjacent leaves that continue
        each other (virtually and physically, same permissions) are merged. Tables that point
        back at themselves could describe billions of leaves: past `max_leaves`, VmstateError."""
        pending: Mapping | None = None
        for count, leaf in enumerate(self._leaves(self.root, 0, 0, True, True, True)):
            if count >= max_leaves:
                raise VmstateError(f"the page tables map more than {max_leaves} separate pages")
            if (pending and pending.virtual + pending.size == leaf.virtual
                    and pending.physical + pending.size == leaf.physical
                    and (pending.writable, pending.user, pending.executable)
                    == (leaf.writable, leaf.user, leaf.executable)):
                pending = Mapping(pending.virtual, pending.physical, pending.size + leaf.size,
                                  leaf.writable, leaf.user, leaf.executable)
                continue
            if pending:
                yield pending
            pending = leaf
        if pending:
            yield pending

    def _leaves(self, table: int, level: int, base: int, writable: bool, user: bool,
                executable: bool) -> Iterator[Mapping]:
        entries = self._table(table)
        if entries is None:
            return
        shift = LEVEL_SHIFTS[level]
        for index, entry in enumerate(entries):
            if not entry & PTE_P:
                continue
            virtual = _canonical(base | index << shift)
            w, u, x = (writable and bool(entry & PTE_RW), user and bool(entry & PTE_US),
                       executable and not entry & NX)
            if level == 3 or (entry & PTE_PS and level in (1, 2)):
                physical = entry & ADDRESS_MASK & ~((1 << shift) - 1)
                yield Mapping(virtual, physical, 1 << shift, w, u, x)
            else:
                yield from self._leaves(entry & ADDRESS_MASK, level + 1, virtual, w, u, x)
