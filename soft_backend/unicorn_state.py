"""The one place that moves vmstate's vCPU state into and out of a unicorn CPU.

Unicorn holds the general registers, RFLAGS, FS/GS, the syscall MSRs, the control registers
and the x87/SSE state; everything else (segment descriptor caches, TR/LDT, events, the other
MSRs, CPUID, XCRs, debug registers) stays as in the template the machine was built from: the
image's vCPU on a restore, the VMM's boot template on a fresh boot.

Two things the register API cannot do are done by running a few instructions from a scratch
area outside guest memory (see UNICORN_NOTES): entering ring 3 (writing CS only changes the
selector: an `iretq` through the guest's own GDT does it), and moving the x87/SSE state
(`fxrstor` while entering, `fxsave` under scratch page tables when capturing).
"""

from __future__ import annotations

import struct
from dataclasses import replace

from unicorn import Uc
from unicorn import x86_const as X

from kvm_backend import machine
from vmstate import x86, xsave
from vmstate.paging import PTE_P, PTE_RW, PTE_US
from vmstate.state import GP_REGISTERS, CpuidEntry, Registers, VcpuState

SCRATCH = machine.MAX_MEMORY + 0x10000          # physical, above the doorbell: no guest RAM
SCRATCH_SIZE = 0x10000
CODE, DATA, STACK_TOP, TABLES = SCRATCH, SCRATCH + 0x1000, SCRATCH + 0x2000, SCRATCH + 0x2000
FXSAVE_AREA = DATA                               # 512 bytes, 16-byte aligned
XSTATE_BV_OFFSET, XSTATE_X87_SSE = 512, 0x3      # XSAVE header: the legacy region is valid

GPR_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GP_REGISTERS}
MSRS_HELD = (x86.MSR_STAR, x86.MSR_LSTAR, x86.MSR_CSTAR, x86.MSR_SYSCALL_MASK,
             x86.MSR_KERNEL_GS_BASE)


def _mov_imm64(register_code: int, value: int) -> bytes:
    return bytes((0x48, 0xB8 + register_code)) + struct.pack("<Q", value)


RAX, RSP = 0, 4
FXRSTOR64_RAX, FXSAVE64_RAX, IRETQ = b"\x48\x0f\xae\x08", b"\x48\x0f\xae\x00", b"\x48\xcf"
ENTER_CODE = (_mov_imm64(RAX, FXSAVE_AREA) + FXRSTOR64_RAX + _mov_imm64(RSP, STACK_TOP - 40)
              + IRETQ)
SAVE_FPU_CODE = _mov_imm64(RAX, FXSAVE_AREA) + FXSAVE64_RAX
SAVE_FPU_AT = CODE + 0x100
CPUID_AT = CODE + 0x200


def map_scratch(uc: Uc) -> None:
    """Scratch code and data, and page tables mapping them (user, writable) for capture."""
    uc.mem_map(SCRATCH, SCRATCH_SIZE)
    uc.mem_write(CODE, ENTER_CODE)
    uc.mem_write(SAVE_FPU_AT, SAVE_FPU_CODE)
    uc.mem_write(CPUID_AT, b"\x0f\xa2")
    pml4, pdpt, pd, pt = (TABLES + 0x1000 * i for i in range(1, 5))
    flags = PTE_P | PTE_RW | PTE_US
    for table, index, target in ((pml4, SCRATCH >> 39, pdpt), (pdpt, (SCRATCH >> 30) & 511, pd),
                                 (pd, (SCRATCH >> 21) & 511, pt)):
        uc.mem_write(table + 8 * index, struct.pack("<Q", target | flags))
    for page in range(SCRATCH_SIZE // 0x1000):
        address = SCRATCH + page * 0x1000
        uc.mem_write(pt + 8 * ((address >> 12) & 511), struct.pack("<Q", address | flags))


SCRATCH_CR3 = TABLES + 0x1000


def enter(uc: Uc, vcpu: VcpuState) -> None:
    """Load `vcpu` into a fresh unicorn CPU (paging still off, ring 0): x87/SSE, descriptor
    tables, then an `iretq` into the guest's ring 3, then the guest's paging and registers."""
    regs, sregs = vcpu.regs, vcpu.sregs
    uc.mem_write(FXSAVE_AREA, _legacy_region(vcpu.xsave))
    uc.mem_write(STACK_TOP - 40, struct.pack("<5Q", regs.rip, sregs.cs.selector, regs.rflags,
                                             regs.rsp, sregs.ss.selector))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
    uc.reg_write(X.UC_X86_REG_CR4, sregs.cr4)
    uc.msr_write(x86.MSR_EFER, sregs.efer)
    uc.emu_start(CODE, regs.rip)
    uc.reg_write(X.UC_X86_REG_CR3, sregs.cr3)
    uc.reg_write(X.UC_X86_REG_CR0, sregs.cr0)
    uc.reg_write_batch([(GPR_IDS[name], getattr(regs, name)) for name in GP_REGISTERS])
    for index in MSRS_HELD:
        value = vcpu.msr(index)
        if value is not None:
            uc.msr_write(index, value)
    # A selector write reloads the base from the GDT: selector first, then the base.
    uc.reg_write(X.UC_X86_REG_FS, sregs.fs.selector)
    uc.reg_write(X.UC_X86_REG_GS, sregs.gs.selector)
    uc.reg_write(X.UC_X86_REG_FS_BASE, vcpu.msr(x86.MSR_FS_BASE, sregs.fs.base))
    uc.reg_write(X.UC_X86_REG_GS_BASE, vcpu.msr(x86.MSR_GS_BASE, sregs.gs.base))


def capture(uc: Uc, template: VcpuState) -> VcpuState:
    """The vCPU as unicorn holds it, on top of `template` (for what unicorn does not hold).
    CR2 is never taken from unicorn (it is not reliable there)."""
    values = uc.reg_read_batch([GPR_IDS[name] for name in GP_REGISTERS])
    regs = Registers(**dict(zip(GP_REGISTERS, values)))
    fs_base, gs_base = uc.reg_read(X.UC_X86_REG_FS_BASE), uc.reg_read(X.UC_X86_REG_GS_BASE)
    sregs = template.sregs
    sregs = replace(sregs, fs=replace(sregs.fs, base=fs_base), gs=replace(sregs.gs, base=gs_base))
    msrs = dict(template.msrs)
    msrs.update({index: uc.msr_read(index) for index in MSRS_HELD})
    msrs.update({x86.MSR_FS_BASE: fs_base, x86.MSR_GS_BASE: gs_base})
    return replace(template, regs=regs, sregs=sregs, msrs=tuple(msrs.items()),
                   xsave=_with_legacy_region(template.xsave, _fxsave(uc, regs)))


def _fxsave(uc: Uc, regs: Registers) -> bytes:
    """Run `fxsave` from the scratch page under scratch page tables, then put back CR3, RIP
    and RAX (the only state it touches)."""
    cr3 = uc.reg_read(X.UC_X86_REG_CR3)
    uc.reg_write(X.UC_X86_REG_CR3, SCRATCH_CR3)
    try:
        uc.emu_start(SAVE_FPU_AT, 0, count=2)
        return bytes(uc.mem_read(FXSAVE_AREA, xsave.LEGACY_SIZE))
    finally:
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        uc.reg_write_batch([(X.UC_X86_REG_RIP, regs.rip), (X.UC_X86_REG_RAX, regs.rax)])


def _legacy_region(area: bytes) -> bytes:
    """The x87/SSE region of an XSAVE area; the CPU's reset state (FCW 0x37f, MXCSR 0x1f80)
    if the template has none (a fresh boot)."""
    if len(area) >= xsave.LEGACY_SIZE:
        return area[:xsave.LEGACY_SIZE]
    return RESET_FPU.ljust(xsave.LEGACY_SIZE, b"\0")


RESET_FPU = struct.pack("<HHBxHQQII", 0x37F, 0, 0, 0, 0, 0, 0x1F80, 0xFFFF)


def _with_legacy_region(area: bytes, legacy: bytes) -> bytes:
    """An XSAVE area (KVM's layout, at least 4 KiB) whose legacy region is `legacy` and whose
    header says the x87 and SSE components are valid; the rest of `area` is kept."""
    out = bytearray(area.ljust(4096, b"\0"))
    out[:xsave.LEGACY_SIZE] = legacy
    bv = struct.unpack_from("<Q", out, XSTATE_BV_OFFSET)[0] | XSTATE_X87_SSE
    struct.pack_into("<Q", out, XSTATE_BV_OFFSET, bv)
    return bytes(out)


def unicorn_cpuid(uc: Uc) -> tuple[CpuidEntry, ...]:
    """The CPUID table of unicorn's own CPU model, for a guest booted on it (paging off,
    before `enter`)."""
    def ask(function: int, index: int = 0) -> tuple[int, int, int, int]:
        uc.reg_write_batch([(X.UC_X86_REG_RAX, function), (X.UC_X86_REG_RCX, index)])
        uc.emu_start(CPUID_AT, 0, count=1)
        return uc.reg_read_batch([X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX,
                                  X.UC_X86_REG_RDX])
    entries = []
    for base in (0, 0x80000000):
        top = ask(base)[0]
        for function in range(base, min(top, base + 0x20) + 1):
            indexed = function in (4, 7, 0xB, 0xD)
            for index in range(4 if indexed else 1):
                eax, ebx, ecx, edx = ask(function, index)
                entries.append(CpuidEntry(function, index, int(indexed), eax, ebx, ecx, edx))
    return tuple(entries)
