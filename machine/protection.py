"""mprotect in the guest's page tables. User memory is mapped with 2 MiB pages; a 2 MiB page
whose 4 KiB pages need different protections is split into a page table taken from a pool
in the low 2 MiB (PT_POOL_START..PT_POOL_END), so that the page tables themselves say which
pages are split and no other state is needed (they are in guest memory, saved with it).
Read-only pages are present without RW; PROT_NONE pages are not present. Execute permission
is not enforced (the guest runs without EFER.NXE). After a change the CPU must drop what it
cached of the old tables (each machine's forget_translations)."""

from __future__ import annotations

import struct
from typing import Callable

from vmstate.paging import PTE_P, PTE_PS, PTE_RW, PTE_US
from vmstate.state import PAGE_SIZE

from . import layout

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PT_POOL_START, PT_POOL_END = 0x57000, layout.VDSO_ADDR
ENTRY = struct.Struct("<Q")
USER_RW = PTE_P | PTE_RW | PTE_US


def protect(memory, addr: int, length: int, prot: int, flush: Callable[[], None]) -> bool:
    """Give [addr, addr+length) (page aligned, in user memory) the protection `prot`, then
    call `flush` (the CPU's way to forget cached translations) if a page table changed. False
    if the page-table pool is exhausted (the range is then left as it was). Either CPU's
    guest memory: the tables are the guest's own."""
    wanted = 0 if not prot & (PROT_READ | PROT_WRITE | PROT_EXEC) else \
        PTE_P | PTE_US | (PTE_RW if prot & PROT_WRITE else 0)
    changed = False
    page = addr
    while page < addr + length:
        large = page & ~(layout.LARGE_PAGE - 1)
        end = min(addr + length, large + layout.LARGE_PAGE)
        pd_slot = layout.PD_ADDR + 8 * (large // layout.LARGE_PAGE)
        (pd_entry,) = ENTRY.unpack(memory.read_phys(pd_slot, 8))
        if pd_entry & PTE_PS:
            if wanted == USER_RW:
                page = end
                continue                      # already mapped read-write as a whole
            table = _take_pool_page(memory)
            if table is None:
                return False
            memory.write_phys(table, struct.pack("<512Q", *(
                a | USER_RW for a in range(large, large + layout.LARGE_PAGE, PAGE_SIZE))))
            memory.write_phys(pd_slot, ENTRY.pack(table | USER_RW))
            pd_entry = table | USER_RW
        table = pd_entry & ~0xFFF
        first, count = (page - large) // PAGE_SIZE, (end - page) // PAGE_SIZE
        memory.write_phys(table + 8 * first, struct.pack(f"<{count}Q", *(
            a | wanted for a in range(page, end, PAGE_SIZE))))
        changed = True
        page = end
    if changed:
        flush()
    return True


def _take_pool_page(memory) -> int | None:
    """A pool page no page directory entry uses yet."""
    pds = memory.read_phys(layout.PD_ADDR, 8 * (memory.size // layout.LARGE_PAGE))
    used = {e & ~0xFFF for (e,) in struct.iter_unpack("<Q", pds) if e & PTE_P and not e & PTE_PS}
    for page in range(PT_POOL_START, PT_POOL_END, PAGE_SIZE):
        if page not in used:
            return page
    return None

