"""The guest's tiny "kernel": descriptor tables, page tables and the two entry stubs.

Guest physical memory is identity-mapped (virtual == physical). Layout of the first 2 MiB:

    0x000000  null guard page (not mapped: a null dereference faults)
    0x001000  GDT        0x002000  IDT        0x003000  TSS           (supervisor only)
    0x004000  stub page: 256 exception stubs (8 bytes each), then the syscall entry
    0x1fe000  the vDSO (linux_personality/vdso.py): user-readable, named by AT_SYSINFO_EHDR
    0x1ff000  the doorbell page: user-writable, mapped to DOORBELL_GPA where no memory is
    0x005000  PML4       0x006000  PDPT       0x007000  PT for 0..2 MiB
    0x008000  one page directory per GiB of memory (up to MAX_MEMORY)
    0x050000  exception stack (TSS RSP0)      0x054000  double-fault stack (IST1)
    0x056000  PT for the 2 MiB holding the stack guard page (4 KiB pages)
    0x200000  user memory: program, heap, mmap area, stack (2 MiB pages, user accessible),
              except the guard page right below the stack: not mapped, so a runaway
              recursion faults there (a page fault) instead of running into the mmap area

Applications run in ring 3. `syscall` jumps to the syscall entry, whose one instruction stores
a byte to the doorbell page; no memory slot backs it, so KVM exits with KVM_EXIT_MMIO. The VMM
services the call and returns to the application itself (RIP = RCX, RFLAGS = R11, user CS/SS).
A store to the doorbell page's byte 8 (the spare doorbell) exits the same way and the VMM
just runs the guest on: the bare exit round trip the benchmarks compare a system call with.
This works on hardware KVM, where `syscall` enters ring 0, and on KVM-PVM, where it stays in
ring 3, where `hlt`/`out` fault and where hardware breakpoints do not exit (measured). Guest
ring 0 (emulated on PVM, ~2000x slower) only ever runs an exception stub: push the vector and
`hlt`, an exit to the VMM, which reports the fault.
"""

from __future__ import annotations

import struct

from linux_personality import vdso
from vmstate import x86
from vmstate.paging import PTE_P, PTE_PS, PTE_RW, PTE_US
from vmstate.state import (
    DescriptorTable, PAGE_SIZE, Registers, Segment, SpecialRegisters)
# User memory's start, the memory limit and the page size, declared with the restore checks.
from vmstate.validate import LARGE_PAGE, MAX_MEMORY, USER_START

GDT_ADDR, IDT_ADDR, TSS_ADDR, STUB_ADDR = 0x1000, 0x2000, 0x3000, 0x4000
PML4_ADDR, PDPT_ADDR, PT_LOW_ADDR, PD_ADDR = 0x5000, 0x6000, 0x7000, 0x8000
EXCEPTION_STACK_TOP, DOUBLE_FAULT_STACK_TOP = 0x54000, 0x56000
PT_GUARD_ADDR = 0x56000
DOORBELL_VA, DOORBELL_GPA = 0x1FF000, MAX_MEMORY   # a guest physical address with no memory
VDSO_ADDR = 0x1FE000
SPARE_DOORBELL_GPA = DOORBELL_GPA + 8   # a write here is answered by running on: a bare exit

EXCEPTION_STUB_SIZE = 8
SYSCALL_ENTRY = STUB_ADDR + 256 * EXCEPTION_STUB_SIZE

# Selectors follow Linux so that debuggers see familiar values (user CS 0x33, SS 0x2b).
KERNEL_CS, KERNEL_DS, USER_CS32, USER_DS, USER_CS, TSS_SEL = 0x10, 0x18, 0x20, 0x2B, 0x33, 0x40
STAR = (0x20 << 48) | (KERNEL_CS << 32)   # sysret: CS = 0x20+16 | 3, SS = 0x20+8 | 3
SYSCALL_MASK = 0x47700                    # TF DF IF IOPL NT AC cleared on syscall entry


CR0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_WP | x86.CR0_PG
CR4 = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT
EFER = x86.EFER_SCE | x86.EFER_LME | x86.EFER_LMA

_GDT = struct.Struct("<10Q")
_IDT_GATE = struct.Struct("<HHBBHII")
_TSS = struct.Struct("<IQQQQ7QQHH")


def _gdt_entries() -> list[int]:
    flat = 0x0000_0000_0000_FFFF | (0xF << 48)     # base 0, limit 0xfffff
    code64, data, g, db, long = 0x9B << 40, 0x93 << 40, 1 << 55, 1 << 54, 1 << 53
    dpl3 = 3 << 45
    tss_low = ((0x67) | ((TSS_ADDR & 0xFFFFFF) << 16) | (0x89 << 40)
               | ((TSS_ADDR >> 24) & 0xFF) << 56)
    return [0, 0, flat | code64 | g | long, flat | data | g | db,
            flat | code64 | dpl3 | g | db, flat | data | dpl3 | g | db,
            flat | code64 | dpl3 | g | long, 0, tss_low, TSS_ADDR >> 32]


def exception_stub(vector: int) -> bytes:
    """push $0 (for vectors without an error code); push $vector; hlt — padded to 8 bytes."""
    push_vector = b"\x68" + struct.pack("<I", vector)
    code = (b"" if x86.has_error_code(vector) else b"\x6a\x00") + push_vector + b"\xf4"
    return code.ljust(EXCEPTION_STUB_SIZE, b"\x90")


# mov %al, DOORBELL_VA (the MMIO exit), then ud2 in case the VMM ever lets it run on.
SYSCALL_ENTRY_CODE = b"\x88\x04\x25" + struct.pack("<I", DOORBELL_VA) + b"\x0f\x0b"


def _idt() -> bytes:
    gates = []
    for vector in range(256):
        handler = STUB_ADDR + vector * EXCEPTION_STUB_SIZE
        ist = 1 if vector == 8 else 0
        gates.append(_IDT_GATE.pack(handler & 0xFFFF, KERNEL_CS, ist, 0x8E,
                                    (handler >> 16) & 0xFFFF, handler >> 32, 0))
    return b"".join(gates)


def page_tables(memory_size: int, guard_page: int) -> list[tuple[int, bytes]]:
    """Identity map: 4 KiB pages below 2 MiB (guard, supervisor-only kernel, user stub page
    and vDSO),
    2 MiB user pages from USER_START to the end of memory, but 4 KiB pages around the stack
    guard page, which is left out."""
    gib = (memory_size + (1 << 30) - 1) >> 30
    pml4 = struct.pack("<Q", PDPT_ADDR | PTE_P | PTE_RW | PTE_US)
    pdpt = struct.pack(f"<{gib}Q", *(PD_ADDR + i * PAGE_SIZE | PTE_P | PTE_RW | PTE_US
                                     for i in range(gib)))
    pt_low = [0] * 512
    for addr in range(GDT_ADDR, DOUBLE_FAULT_STACK_TOP, PAGE_SIZE):
        pt_low[addr // PAGE_SIZE] = addr | PTE_P | PTE_RW
    pt_low[STUB_ADDR // PAGE_SIZE] = STUB_ADDR | PTE_P | PTE_US   # read-only, user: see above
    pt_low[DOORBELL_VA // PAGE_SIZE] = DOORBELL_GPA | PTE_P | PTE_RW | PTE_US
    pt_low[VDSO_ADDR // PAGE_SIZE] = VDSO_ADDR | PTE_P | PTE_US                # read-only
    pd_entries = [PT_LOW_ADDR | PTE_P | PTE_RW | PTE_US] + [
        addr | PTE_P | PTE_RW | PTE_US | PTE_PS for addr in range(USER_START, memory_size, LARGE_PAGE)]
    guard_large = guard_page & ~(LARGE_PAGE - 1)
    pd_entries[guard_large // LARGE_PAGE] = PT_GUARD_ADDR | PTE_P | PTE_RW | PTE_US
    pt_guard = [addr | PTE_P | PTE_RW | PTE_US if addr != guard_page else 0
                for addr in range(guard_large, guard_large + LARGE_PAGE, PAGE_SIZE)]
    pds = struct.pack(f"<{len(pd_entries)}Q", *pd_entries)
    return [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PT_LOW_ADDR, struct.pack("<512Q", *pt_low)),
            (PD_ADDR, pds), (PT_GUARD_ADDR, struct.pack("<512Q", *pt_guard))]


def boot_structures(memory_size: int, guard_page: int) -> list[tuple[int, bytes]]:
    """(guest physical address, bytes) pairs to write into fresh guest memory."""
    tss = _TSS.pack(0, EXCEPTION_STACK_TOP, 0, 0, 0,
                    DOUBLE_FAULT_STACK_TOP, 0, 0, 0, 0, 0, 0, 0, 0, _TSS.size)
    stubs = b"".join(exception_stub(v) for v in range(256)) + SYSCALL_ENTRY_CODE
    return ([(GDT_ADDR, _GDT.pack(*_gdt_entries())), (IDT_ADDR, _idt()), (TSS_ADDR, tss),
             (STUB_ADDR, stubs), (VDSO_ADDR, vdso.IMAGE)] + page_tables(memory_size, guard_page))


def _user_segment(selector: int, code: bool) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 0x3,
                   present=1, dpl=3, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


USER_CODE_SEGMENT = _user_segment(USER_CS, code=True)
USER_DATA_SEGMENT = _user_segment(USER_DS, code=False)


def boot_sregs(apic_base: int) -> SpecialRegisters:
    null_data = _user_segment(0, code=False)
    return SpecialRegisters(
        cs=USER_CODE_SEGMENT, ds=USER_DATA_SEGMENT, es=USER_DATA_SEGMENT, ss=USER_DATA_SEGMENT,
        fs=null_data, gs=null_data,
        tr=Segment(selector=TSS_SEL, base=TSS_ADDR, limit=0x67, type=0xB, present=1),
        ldt=Segment(type=0x2, present=1, unusable=1),
        gdt=DescriptorTable(GDT_ADDR, _GDT.size - 1), idt=DescriptorTable(IDT_ADDR, 256 * 16 - 1),
        cr0=CR0, cr3=PML4_ADDR, cr4=CR4, efer=EFER, apic_base=apic_base)


def boot_registers(entry: int, stack_pointer: int) -> Registers:
    return Registers(rip=entry, rsp=stack_pointer, rflags=x86.RFLAGS_FIXED | x86.RFLAGS_IF)


BOOT_MSRS = ((x86.MSR_STAR, STAR), (x86.MSR_LSTAR, SYSCALL_ENTRY), (x86.MSR_CSTAR, SYSCALL_ENTRY),
             (x86.MSR_SYSCALL_MASK, SYSCALL_MASK), (x86.MSR_FS_BASE, 0), (x86.MSR_GS_BASE, 0),
             (x86.MSR_KERNEL_GS_BASE, 0))


def user_return_segments(star: int) -> tuple[Segment, Segment]:
    """The CS and SS that `sysretq` would load, given the STAR MSR."""
    base = (star >> 48) & 0xFFFF
    return (_user_segment((base + 16) | 3, code=True), _user_segment((base + 8) | 3, code=False))
