"""ctypes mirrors of the <linux/kvm.h> structures the VMM uses (x86-64 ABI).

Each layout is declared once here and pinned at import time against the sizes the kernel
headers give, so a typo in a field list fails loudly instead of corrupting state.
"""

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
        ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
        ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SREGS_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


class kvm_sregs(ctypes.Structure):
    _fields_ = ([(name, kvm_segment) for name in SREGS_SEGMENTS]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(name, u64) for name in SREGS_CONTROL]
                + [("interrupt_bitmap", u64 * 4)])


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs(count: int) -> ctypes.Structure:
    """A kvm_msrs header followed by `count` entries (a flexible array in C)."""
    class _kvm_msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * count)]
    return _kvm_msrs()


def kvm_msr_list(count: int) -> ctypes.Structure:
    class _kvm_msr_list(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * count)]
    return _kvm_msr_list(nmsrs=count)


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32),
                ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


def kvm_cpuid2(count: int) -> ctypes.Structure:
    class _kvm_cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count)]
    return _kvm_cpuid2(nent=count)


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class _exception_event(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _interrupt_event(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi_event(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi_event(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _exception_event), ("interrupt", _interrupt_event), ("nmi", _nmi_event),
        ("sipi_vector", u32), ("flags", u32), ("smi", _smi_event),
        ("triple_fault_pending", u8), ("reserved", u8 * 26), ("exception_has_payload", u8),
        ("exception_payload", u64)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


XSAVE_LEGACY_SIZE = 4096
XSAVE_MAX_SIZE = 1 << 16       # far above any CPU's XSAVE size (AMX makes ~11 KiB)


def kvm_xsave(size: int = XSAVE_LEGACY_SIZE) -> ctypes.Array:
    """struct kvm_xsave is a u32 array; KVM_CAP_XSAVE2 may report a larger size."""
    return (u32 * (size // 4))()


# --- struct kvm_run (the shared page returned by mmap on the vCPU fd) -------------------------

class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_debug(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("debug", kvm_run_debug), ("mmio", kvm_run_mmio),
                ("fail_entry", kvm_run_fail_entry), ("internal", kvm_run_internal),
                ("system_event", kvm_run_system_event), ("padding", u8 * 256)]


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", kvm_sync_regs)]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

KVM_CAP_SYNC_REGS = 74
KVM_CAP_XSAVE2 = 208

KVM_MP_STATE_RUNNABLE = 0

# The ABI pinned against the kernel headers (sizes measured with the C compiler).
for _struct, _size in (
        (kvm_regs, 144), (kvm_segment, 24), (kvm_dtable, 16), (kvm_sregs, 312),
        (kvm_msr_entry, 16), (kvm_cpuid_entry2, 40), (kvm_xcrs, 392), (kvm_vcpu_events, 64),
        (kvm_debugregs, 128), (kvm_userspace_memory_region, 32),
        (kvm_dirty_log, 16), (kvm_mp_state, 4)):
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)
assert kvm_run.exit_reason.offset == 8 and kvm_run.exit.offset == 32
assert kvm_run.kvm_valid_regs.offset == 288 and kvm_run.kvm_dirty_regs.offset == 296
assert kvm_run.s.offset == 304
assert kvm_vcpu_events.exception_payload.offset == 56
