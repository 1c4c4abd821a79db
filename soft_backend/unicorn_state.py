"""The one place that moves vmstate's vCPU state into and out of a unicorn CPU.

Unicorn holds the general registers, RFLAGS, FS/GS, the syscall MSRs, the control registers
and the x87/SSE state; everything else (segment descriptor caches, TR/LDT, events, the other
MSRs, CPUID, XCRs, debug registers) stays as in the template the machine was built from: the
image's vCPU on a restore, the VMM's boot template on a fresh boot.

Entering ring 3 is what the register API cannot do (writing CS only changes the selector):
an `iretq` through the guest's own GDT, run from a scratch page outside guest memory before
the guest's paging is on, does it (see UNICORN_NOTES). The x87/SSE state moves through the
register API in the FXSAVE layout, so that it can also be read and written inside a hook.
"""

from __future__ import annotations

import struct
from dataclasses import replace

from unicorn import Uc
from unicorn import x86_const as X

from machine import layout
from vmstate import x86, xsave
from vmstate.state import GP_REGISTERS, CpuidEntry, Registers, VcpuState

SCRATCH = layout.MAX_MEMORY + 0x10000          # physical, above the doorbell: no guest RAM
SCRATCH_SIZE = 0x2000
CODE, STACK_TOP = SCRATCH, SCRATCH + SCRATCH_SIZE
IRET_FRAME = STACK_TOP - 40
XSTATE_BV_OFFSET, XSTATE_X87_SSE = 512, 0x3      # XSAVE header: the legacy region is valid
LEGACY_DEFINED = 416                             # FXSAVE bytes 416-511 are software's

GPR_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GP_REGISTERS}
MSRS_HELD = (x86.MSR_STAR, x86.MSR_LSTAR, x86.MSR_CSTAR, x86.MSR_SYSCALL_MASK,
             x86.MSR_KERNEL_GS_BASE)


def _mov_imm64(register_code: int, value: int) -> bytes:
    return bytes((0x48, 0xB8 + register_code)) + struct.pack("<Q", value)


RSP = 4
IRETQ = b"\x48\xcf"
ENTER_CODE = _mov_imm64(RSP, IRET_FRAME) + IRETQ
CPUID_AT = CODE + 0x100


def map_scratch(uc: Uc) -> None:
    """The scratch page's code: the entry into ring 3, and a `cpuid` (for unicorn_cpuid)."""
    uc.mem_map(SCRATCH, SCRATCH_SIZE)
    uc.mem_write(CODE, ENTER_CODE)
    uc.mem_write(CPUID_AT, b"\x0f\xa2")


def enter(uc: Uc, vcpu: VcpuState) -> None:
    """Load `vcpu` into a fresh unicorn CPU (paging still off, ring 0): descriptor tables, an
    `iretq` into the guest's ring 3, then the guest's paging, registers and x87/SSE state."""
    regs, sregs = vcpu.regs, vcpu.sregs
    uc.mem_write(IRET_FRAME, struct.pack("<5Q", regs.rip, sregs.cs.selector, regs.rflags,
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
    write_legacy_fpu(uc, _legacy_region(vcpu.xsave))


def capture(uc: Uc, template: VcpuState, registers: dict[str, int] | None = None
            ) -> VcpuState:
    """The vCPU as unicorn holds it, on top of `template` (for what unicorn does not hold);
    `registers` overrides general registers (a system call under way: as it will return).
    CR2 is never taken from unicorn (it is not reliable there)."""
    values = dict(zip(GP_REGISTERS, uc.reg_read_batch([GPR_IDS[name] for name in GP_REGISTERS])))
    values.update((name, value) for name, value in (registers or {}).items() if name in values)
    regs = Registers(**values)
    fs_base, gs_base = uc.reg_read(X.UC_X86_REG_FS_BASE), uc.reg_read(X.UC_X86_REG_GS_BASE)
    sregs = template.sregs
    sregs = replace(sregs, fs=replace(sregs.fs, base=fs_base), gs=replace(sregs.gs, base=gs_base))
    msrs = dict(template.msrs)
    msrs.update({index: uc.msr_read(index) for index in MSRS_HELD})
    msrs.update({x86.MSR_FS_BASE: fs_base, x86.MSR_GS_BASE: gs_base})
    return replace(template, regs=regs, sregs=sregs, msrs=tuple(msrs.items()),
                   xsave=xsave_area(uc, template.xsave))


def xsave_area(uc: Uc, template_area: bytes) -> bytes:
    """`template_area` (an XSAVE area) with unicorn's x87/SSE state in its legacy region."""
    legacy = read_legacy_fpu(uc)[:LEGACY_DEFINED] + \
        _legacy_region(template_area)[LEGACY_DEFINED:]
    return _with_legacy_region(template_area, legacy)


def _legacy_region(area: bytes) -> bytes:
    """The x87/SSE region of an XSAVE area; the CPU's reset state (FCW 0x37f, MXCSR 0x1f80)
    if the template has none (a fresh boot)."""
    if len(area) >= xsave.LEGACY_SIZE:
        return bytes(area[:xsave.LEGACY_SIZE])
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


# -- x87/SSE through the register API (usable inside a hook, where no code can be run) ------

FPU_CONTROL = struct.Struct("<HHBxHQQII")          # as vmstate.xsave.CONTROL
FP_IDS = [getattr(X, f"UC_X86_REG_FP{i}") for i in range(8)]
XMM_IDS = [getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)]
MXCSR_MASK = 0xFFFF
EMPTY = 3


def read_legacy_fpu(uc: Uc) -> bytes:
    """The x87/SSE state in the FXSAVE layout. Unicorn's FP0-7 are the physical registers
    (ST(i) = FP[(TOP + i) & 7]) and its tag word is the full one (3 = empty)."""
    fcw, fsw, ftag, mxcsr, fop, fip, fdp = (uc.reg_read(r) for r in (
        X.UC_X86_REG_FPCW, X.UC_X86_REG_FPSW, X.UC_X86_REG_FPTAG, X.UC_X86_REG_MXCSR,
        X.UC_X86_REG_FOP, X.UC_X86_REG_FIP, X.UC_X86_REG_FDP))
    top = (fsw >> 11) & 7
    abridged = sum(1 << k for k in range(8) if (ftag >> (2 * k)) & 3 != EMPTY)
    area = bytearray(xsave.LEGACY_SIZE)
    FPU_CONTROL.pack_into(area, 0, fcw, fsw, abridged, fop, fip, fdp, mxcsr, MXCSR_MASK)
    for i in range(8):
        mantissa, exponent = uc.reg_read(FP_IDS[(top + i) & 7])
        area[32 + 16 * i:42 + 16 * i] = struct.pack("<QH", mantissa, exponent)
    for i, register in enumerate(XMM_IDS):
        area[160 + 16 * i:176 + 16 * i] = uc.reg_read(register).to_bytes(16, "little")
    return bytes(area)


def write_legacy_fpu(uc: Uc, area: bytes) -> None:
    """The reverse of read_legacy_fpu."""
    fcw, fsw, abridged, fop, fip, fdp, mxcsr, _ = FPU_CONTROL.unpack_from(area, 0)
    top = (fsw >> 11) & 7
    ftag = sum((0 if abridged >> k & 1 else EMPTY) << (2 * k) for k in range(8))
    for register, value in ((X.UC_X86_REG_FPCW, fcw), (X.UC_X86_REG_FPSW, fsw),
                            (X.UC_X86_REG_FPTAG, ftag), (X.UC_X86_REG_MXCSR, mxcsr),
                            (X.UC_X86_REG_FOP, fop), (X.UC_X86_REG_FIP, fip),
                            (X.UC_X86_REG_FDP, fdp)):
        uc.reg_write(register, value)
    for i in range(8):
        uc.reg_write(FP_IDS[(top + i) & 7], struct.unpack_from("<QH", area, 32 + 16 * i))
    for i, register in enumerate(XMM_IDS):
        uc.reg_write(register, int.from_bytes(area[160 + 16 * i:176 + 16 * i], "little"))
