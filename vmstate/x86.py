"""x86-64 architectural constants shared by the VMM and the toolkit: control-register bits,
MSR indices and names, exception vectors."""

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
CR4_LA57 = 1 << 12
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11

RFLAGS_FIXED = 1 << 1      # bit 1 always reads as 1
RFLAGS_TF, RFLAGS_IF, RFLAGS_DF, RFLAGS_RF = 1 << 8, 1 << 9, 1 << 10, 1 << 16

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_TSC_AUX = (
    0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103)

MSR_NAMES = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME", 0x1B: "IA32_APIC_BASE",
    0x34: "SMI_COUNT", 0x3A: "IA32_FEATURE_CONTROL", 0x3B: "IA32_TSC_ADJUST",
    0x8B: "IA32_UCODE_REV", 0xCE: "PLATFORM_INFO", 0x10A: "IA32_ARCH_CAPABILITIES",
    0x140: "MISC_FEATURES_ENABLES", 0x174: "IA32_SYSENTER_CS", 0x175: "IA32_SYSENTER_ESP",
    0x176: "IA32_SYSENTER_EIP", 0x17A: "IA32_MCG_STATUS", 0x17B: "IA32_MCG_CTL",
    0x1A0: "IA32_MISC_ENABLE", 0x1D9: "IA32_DEBUGCTL", 0x1DB: "LAST_BRANCH_FROM_IP",
    0x1DC: "LAST_BRANCH_TO_IP", 0x1DD: "LAST_EXCEPTION_FROM_IP", 0x1DE: "LAST_EXCEPTION_TO_IP",
    0x1FC: "IA32_POWER_CTL", 0x277: "IA32_CR_PAT", 0x345: "IA32_PERF_CAPABILITIES",
    0x6E0: "IA32_TSC_DEADLINE", 0xC0000080: "EFER", 0xC0000081: "STAR", 0xC0000082: "LSTAR",
    0xC0000083: "CSTAR", 0xC0000084: "SYSCALL_MASK", 0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE", 0xC0000102: "KERNEL_GS_BASE", 0xC0000103: "TSC_AUX",
    0xC0010015: "AMD64_HWCR", 0xC0010117: "AMD64_VM_HSAVE_PA", 0xC001011F: "AMD64_VIRT_SPEC_CTRL",
    0x4B564D00: "KVM_WALL_CLOCK_NEW", 0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN", 0x4B564D03: "KVM_STEAL_TIME", 0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL", 0x4B564D06: "KVM_ASYNC_PF_INT", 0x4B564D07: "KVM_ASYNC_PF_ACK",
}

# Exception vectors: (mnemonic, name, pushes an error code, POSIX signal a process would get).
EXCEPTIONS = {
    0: ("#DE", "divide error", False, 8), 1: ("#DB", "debug", False, 5),
    2: ("NMI", "non-maskable interrupt", False, 5), 3: ("#BP", "breakpoint", False, 5),
    4: ("#OF", "overflow", False, 11), 5: ("#BR", "bound range", False, 11),
    6: ("#UD", "invalid opcode", False, 4), 7: ("#NM", "device not available", False, 4),
    8: ("#DF", "double fault", True, 11), 10: ("#TS", "invalid TSS", True, 11),
    11: ("#NP", "segment not present", True, 7), 12: ("#SS", "stack fault", True, 7),
    13: ("#GP", "general protection", True, 11), 14: ("#PF", "page fault", True, 11),
    16: ("#MF", "x87 floating-point error", False, 8), 17: ("#AC", "alignment check", True, 7),
    18: ("#MC", "machine check", False, 7), 19: ("#XM", "SIMD floating-point", False, 8),
    20: ("#VE", "virtualization", False, 11), 21: ("#CP", "control protection", True, 11),
    29: ("#VC", "VMM communication", True, 11), 30: ("#SX", "security", True, 11),
}
SIGSEGV = 11


def has_error_code(vector: int) -> bool:
    return EXCEPTIONS.get(vector, ("", "", False, 0))[2]


def msr_name(index: int) -> str:
    return MSR_NAMES.get(index, f"MSR_{index:#x}")


def is_canonical(address: int) -> bool:
    """True if a 48-bit virtual address is canonical (bits 63..47 all equal)."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1
