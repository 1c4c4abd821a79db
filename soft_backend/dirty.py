"""The software CPU's log of the pages the guest writes, for a live migration: the dirty bits
of the guest's own page tables. Unicorn, like a real CPU, sets an entry's D bit the first time
the guest writes through it (a translation cached without D has no write permission); clearing
the bits and flushing unicorn's TLB starts the next round. An entry maps 2 MiB (user memory)
or 4 KiB (the low 2 MiB, around the stack guard page, ranges split by mprotect), so a written
entry stands for all of its pages.

The bits are read and cleared only while the guest runs no instruction (SoftMachine holds the
CPU for it), and the page tables are written back through GuestMemory, so the pages holding
them count as written by the VMM and travel with the rest."""

from __future__ import annotations

import numpy as np

from machine.layout import LARGE_PAGE, PD_ADDR
from vmstate.paging import ADDRESS_MASK, PTE_P, PTE_PS
from vmstate.state import PAGE_SIZE

PTE_D = 0x40                              # the dirty bit of a page-table entry
PAGES_PER_LARGE = LARGE_PAGE // PAGE_SIZE
ENTRIES = PAGE_SIZE // 8


def take_written(memory) -> np.ndarray:
    """One byte per page of guest memory, 1 in every page mapped by an entry the guest has
    written through since the previous call (or since the tables were built); clears those
    entries' D bits. The caller flushes the CPU's TLB before the guest runs again."""
    written = np.zeros(memory.size // PAGE_SIZE, np.uint8)
    directory = _table(memory, PD_ADDR, memory.size // LARGE_PAGE)
    present = directory & PTE_P != 0
    large = present & (directory & PTE_PS != 0)
    _mark(written, directory, large, PAGES_PER_LARGE)
    _clear(memory, PD_ADDR, directory, large)
    for index in np.flatnonzero(present & ~large):
        address = int(directory[index] & ADDRESS_MASK)
        if address + PAGE_SIZE > memory.size:
            continue
        table = _table(memory, address, ENTRIES)
        mapped = table & PTE_P != 0
        _mark(written, table, mapped, 1)
        _clear(memory, address, table, mapped)
    return written


def _table(memory, address: int, count: int) -> np.ndarray:
    return np.frombuffer(memory.read_phys(address, 8 * count), "<u8").copy()


def _mark(written: np.ndarray, entries: np.ndarray, mapped: np.ndarray, pages: int) -> None:
    """Mark the `pages` pages each dirty mapped entry maps (those inside guest memory)."""
    dirty = mapped & (entries & PTE_D != 0)
    first = (entries[dirty] & np.uint64(ADDRESS_MASK & -(pages * PAGE_SIZE))) // PAGE_SIZE
    for start in first.tolist():
        written[start:start + pages] = 1        # a slice past the end is cut short


def _clear(memory, address: int, entries: np.ndarray, mapped: np.ndarray) -> None:
    dirty = mapped & (entries & PTE_D != 0)
    if dirty.any():
        entries[dirty] &= ~np.uint64(PTE_D)
        memory.write_phys(address, entries.tobytes())
