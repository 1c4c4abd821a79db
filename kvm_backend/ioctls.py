"""Every KVM ioctl number the VMM uses, computed from _IOC(dir, type, nr, size).

The size term is taken from the ctypes structure each ioctl carries (see abi.py), never
written as hex by hand, so a layout change cannot leave a stale request number behind.
"""

import ctypes

from . import abi

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# Headers of the flexible-array structures: the ioctl number encodes only the fixed part.
_msr_list_header = ctypes.c_uint32
_msrs_header = ctypes.c_uint64
_cpuid2_header = ctypes.c_uint64
_xsave = abi.kvm_xsave()

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, _msr_list_header)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _cpuid2_header)

# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, abi.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, abi.kvm_userspace_memory_region)

# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, abi.kvm_regs)
KVM_SET_REGS = _iow(0x82, abi.kvm_regs)
KVM_GET_SREGS = _ior(0x83, abi.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, abi.kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, _msrs_header)
KVM_SET_MSRS = _iow(0x89, _msrs_header)
KVM_SET_CPUID2 = _iow(0x90, _cpuid2_header)
KVM_GET_CPUID2 = _iowr(0x91, _cpuid2_header)
KVM_GET_MP_STATE = _ior(0x98, abi.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, abi.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, abi.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, abi.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, abi.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, abi.kvm_debugregs)
KVM_GET_XSAVE = _ior(0xA4, _xsave)
KVM_SET_XSAVE = _iow(0xA5, _xsave)
KVM_GET_XCRS = _ior(0xA6, abi.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, abi.kvm_xcrs)
KVM_GET_XSAVE2 = _ior(0xCF, _xsave)

# Spot checks against values printed by the C preprocessor from <linux/kvm.h>.
assert KVM_RUN == 0xAE80 and KVM_GET_REGS == 0x8090AE81 and KVM_SET_SREGS == 0x4138AE84
assert KVM_GET_MSRS == 0xC008AE88 and KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_GET_XSAVE == 0x9000AEA4
