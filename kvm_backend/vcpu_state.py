"""The one place that converts between vmstate's plain state and live KVM vCPU structures,
and the order in which state is read from and applied to a vCPU."""

from __future__ import annotations

from dataclasses import fields

from vmstate import x86
from vmstate.errors import RestoreError
from vmstate.state import (
    CONTROL_REGISTERS, GP_REGISTERS, SEGMENT_FIELDS, SEGMENT_REGISTERS, CpuidEntry,
    DebugRegisters, DescriptorTable, Registers, Segment, SpecialRegisters, VcpuEvents, VcpuState)

from . import abi
from .kvm import Kvm, Vcpu

# Without these the guest cannot make its next system call or find its TLS: a restore that
# cannot set them fails; any other MSR the destination host refuses is skipped.
ESSENTIAL_MSRS = frozenset({x86.MSR_STAR, x86.MSR_LSTAR, x86.MSR_SYSCALL_MASK, x86.MSR_FS_BASE,
                            x86.MSR_GS_BASE, x86.MSR_KERNEL_GS_BASE})

_EVENT_PATHS = {  # VcpuEvents field -> (struct member, sub-member or None)
    "exception_injected": ("exception", "injected"), "exception_nr": ("exception", "nr"),
    "exception_has_error_code": ("exception", "has_error_code"),
    "exception_pending": ("exception", "pending"),
    "exception_error_code": ("exception", "error_code"),
    "interrupt_injected": ("interrupt", "injected"), "interrupt_nr": ("interrupt", "nr"),
    "interrupt_soft": ("interrupt", "soft"), "interrupt_shadow": ("interrupt", "shadow"),
    "nmi_injected": ("nmi", "injected"), "nmi_pending": ("nmi", "pending"),
    "nmi_masked": ("nmi", "masked"), "sipi_vector": ("sipi_vector", None),
    "flags": ("flags", None), "smi_smm": ("smi", "smm"), "smi_pending": ("smi", "pending"),
    "smi_inside_nmi": ("smi", "smm_inside_nmi"), "smi_latched_init": ("smi", "latched_init"),
    "triple_fault_pending": ("triple_fault_pending", None),
    "exception_has_payload": ("exception_has_payload", None),
    "exception_payload": ("exception_payload", None),
}


# -- plain data <-> ctypes ----------------------------------------------------------------------

def regs_from_kvm(kregs: abi.kvm_regs) -> Registers:
    return Registers(**{name: getattr(kregs, name) for name in GP_REGISTERS})


def regs_to_kvm(regs: Registers, out: abi.kvm_regs | None = None) -> abi.kvm_regs:
    out = out if out is not None else abi.kvm_regs()
    for name in GP_REGISTERS:
        setattr(out, name, getattr(regs, name))
    return out


def segment_from_kvm(kseg: abi.kvm_segment) -> Segment:
    return Segment(**{name: getattr(kseg, name) for name in SEGMENT_FIELDS})


def segment_to_kvm(seg: Segment, out: abi.kvm_segment) -> None:
    for name in SEGMENT_FIELDS:
        setattr(out, name, getattr(seg, name))


def sregs_from_kvm(ks: abi.kvm_sregs) -> SpecialRegisters:
    return SpecialRegisters(
        **{name: segment_from_kvm(getattr(ks, name)) for name in SEGMENT_REGISTERS},
        gdt=DescriptorTable(ks.gdt.base, ks.gdt.limit), idt=DescriptorTable(ks.idt.base, ks.idt.limit),
        **{name: getattr(ks, name) for name in CONTROL_REGISTERS},
        interrupt_bitmap=tuple(ks.interrupt_bitmap))


def sregs_to_kvm(sregs: SpecialRegisters, out: abi.kvm_sregs | None = None) -> abi.kvm_sregs:
    out = out if out is not None else abi.kvm_sregs()
    for name in SEGMENT_REGISTERS:
        segment_to_kvm(getattr(sregs, name), getattr(out, name))
    out.gdt.base, out.gdt.limit = sregs.gdt.base, sregs.gdt.limit
    out.idt.base, out.idt.limit = sregs.idt.base, sregs.idt.limit
    for name in CONTROL_REGISTERS:
        setattr(out, name, getattr(sregs, name))
    out.interrupt_bitmap[:] = sregs.interrupt_bitmap
    return out


def events_from_kvm(kev: abi.kvm_vcpu_events) -> VcpuEvents:
    def get(member, sub):
        value = getattr(kev, member)
        return getattr(value, sub) if sub else value
    return VcpuEvents(**{name: get(*path) for name, path in _EVENT_PATHS.items()})


def events_to_kvm(events: VcpuEvents) -> abi.kvm_vcpu_events:
    kev = abi.kvm_vcpu_events()
    for name, (member, sub) in _EVENT_PATHS.items():
        if sub:
            setattr(getattr(kev, member), sub, getattr(events, name))
        else:
            setattr(kev, member, getattr(events, name))
    return kev


def debugregs_from_kvm(kd: abi.kvm_debugregs) -> DebugRegisters:
    return DebugRegisters(*kd.db, dr6=kd.dr6, dr7=kd.dr7, flags=kd.flags)


def debugregs_to_kvm(d: DebugRegisters) -> abi.kvm_debugregs:
    kd = abi.kvm_debugregs(dr6=d.dr6, dr7=d.dr7, flags=d.flags)
    kd.db[:] = (d.db0, d.db1, d.db2, d.db3)
    return kd


CPUID_FIELDS = tuple(f.name for f in fields(CpuidEntry))    # kvm_cpuid_entry2's, in order


def cpuid_from_kvm(entries: list[abi.kvm_cpuid_entry2]) -> tuple[CpuidEntry, ...]:
    return tuple(CpuidEntry(*(getattr(e, name) for name in CPUID_FIELDS)) for e in entries)


def cpuid_to_kvm(entries: tuple[CpuidEntry, ...]) -> list[abi.kvm_cpuid_entry2]:
    """Field by field: dataclasses.astuple deep-copies each one (0.4 ms of every start)."""
    return [abi.kvm_cpuid_entry2(*(getattr(e, name) for name in CPUID_FIELDS)) for e in entries]


def xcrs_from_kvm(kx: abi.kvm_xcrs) -> tuple[tuple[int, int], ...]:
    return tuple((kx.xcrs[i].xcr, kx.xcrs[i].value) for i in range(kx.nr_xcrs))


def xcrs_to_kvm(xcrs: tuple[tuple[int, int], ...]) -> abi.kvm_xcrs:
    kx = abi.kvm_xcrs(nr_xcrs=len(xcrs))
    for i, (index, value) in enumerate(xcrs):
        kx.xcrs[i].xcr, kx.xcrs[i].value = index, value
    return kx


# -- capture and apply -------------------------------------------------------------------------

def msr_indices(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """Every MSR the host lists that this vCPU can actually read (KVM_GET_MSRS stops at the
    first one it cannot, so probe one at a time once and keep the readable ones)."""
    return [index for index in kvm.msr_index_list() if vcpu.get_msrs([index])]


def capture(kvm: Kvm, vcpu: Vcpu, vcpu_id: int, msr_list: list[int]) -> VcpuState:
    """Read the whole vCPU state. Complete any pending I/O exit before calling this."""
    return VcpuState(
        id=vcpu_id,
        regs=regs_from_kvm(vcpu.get_regs()),
        sregs=sregs_from_kvm(vcpu.get_sregs()),
        msrs=tuple(vcpu.get_msrs(msr_list).items()),
        xsave=vcpu.get_xsave(max(kvm.check_extension(abi.KVM_CAP_XSAVE2), abi.XSAVE_LEGACY_SIZE)),
        xcrs=xcrs_from_kvm(vcpu.get_xcrs()),
        events=events_from_kvm(vcpu.get_vcpu_events()),
        mp_state=vcpu.get_mp_state(),
        debugregs=debugregs_from_kvm(vcpu.get_debugregs()),
        cpuid=cpuid_from_kvm(vcpu.get_cpuid()))


def apply(vcpu: Vcpu, state: VcpuState) -> list[int]:
    """Load a whole vCPU state into a fresh vCPU, in the order KVM needs.

    Returns the MSR indices the host refused (all non-essential). The order and its reasons:
    CPUID first: KVM derives what the vCPU may do (XSAVE size, MSR validity) from it.
    SREGS before REGS and MSRS: they set the mode (CR0/CR4/EFER) the others are checked in.
    REGS before EVENTS: KVM_SET_REGS clears any pending exception, KVM_SET_VCPU_EVENTS restores it.
    XCRS before XSAVE: the XSAVE area may only hold components that XCR0 enables.
    """
    if state.cpuid:
        vcpu.set_cpuid(cpuid_to_kvm(state.cpuid))
    vcpu.set_sregs(sregs_to_kvm(state.sregs))
    vcpu.set_regs(regs_to_kvm(state.regs))
    refused = set_msrs_skipping_refused(vcpu, dict(state.msrs))
    if state.xcrs:
        vcpu.set_xcrs(xcrs_to_kvm(state.xcrs))
    if state.xsave:
        vcpu.set_xsave(state.xsave)
    vcpu.set_debugregs(debugregs_to_kvm(state.debugregs))
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_vcpu_events(events_to_kvm(state.events))
    return refused


def set_msrs_skipping_refused(vcpu: Vcpu, msrs: dict[int, int]) -> list[int]:
    """KVM_SET_MSRS stops at the first MSR it refuses: skip that one and go on."""
    pending, refused = list(msrs.items()), []
    while pending:
        done = vcpu.set_msrs(dict(pending))
        if done == len(pending):
            break
        index, _ = pending[done]
        if index in ESSENTIAL_MSRS:
            raise RestoreError(f"this host's KVM refuses essential MSR {x86.msr_name(index)} "
                               f"({index:#x})")
        refused.append(index)
        pending = pending[done + 1:]
    return refused
