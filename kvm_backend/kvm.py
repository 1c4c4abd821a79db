"""Thin, typed wrappers over the KVM ioctl API: Kvm (/dev/kvm) -> Vm -> Vcpu.

Each method wraps one ioctl. Objects own their file descriptors and close them as context
managers. KVM_RUN results come back as one of the small exit named tuples below.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections import namedtuple

from vmstate.errors import VmstateError
from vmstate.fd import FdOwner
from vmstate.mapping import close_mapping

from . import abi
from .ioctls import (
    KVM_CHECK_EXTENSION, KVM_CREATE_VCPU, KVM_CREATE_VM, KVM_GET_API_VERSION, KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS, KVM_GET_DIRTY_LOG, KVM_GET_MP_STATE, KVM_GET_MSR_INDEX_LIST, KVM_GET_MSRS,
    KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_SUPPORTED_CPUID, KVM_GET_VCPU_EVENTS,
    KVM_GET_VCPU_MMAP_SIZE, KVM_GET_XCRS, KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_RUN,
    KVM_SET_CPUID2, KVM_SET_DEBUGREGS, KVM_SET_MP_STATE, KVM_SET_MSRS,
    KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_USER_MEMORY_REGION, KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS, KVM_SET_XSAVE)

KVM_API_VERSION = 12


class KvmUnavailable(Exception):
    """/dev/kvm is missing, not accessible, or cannot create a VM."""


class KvmIoctlError(VmstateError):
    """An ioctl failed or did less than asked (e.g. KVM_SET_MSRS set fewer MSRs)."""


# --- exits ----------------------------------------------------------------------------------
# Named tuples: one is made per KVM_RUN, and they cost a fraction of a frozen dataclass to
# define at start-up and to create. Match them by class and keyword (never compare two).

IoExit = namedtuple("IoExit", "port is_out size data")
HltExit = namedtuple("HltExit", "")
DebugExit = namedtuple("DebugExit", "pc exception dr6")
MmioExit = namedtuple("MmioExit", "address is_write data")
ShutdownExit = namedtuple("ShutdownExit", "")    # triple fault: no exception could be delivered
FailEntryExit = namedtuple("FailEntryExit", "reason")
InternalErrorExit = namedtuple("InternalErrorExit", "suberror data")
InterruptedExit = namedtuple("InterruptedExit", "")   # EINTR: a signal, or immediate_exit
UnknownExit = namedtuple("UnknownExit", "reason")

Exit = (IoExit | HltExit | DebugExit | MmioExit | ShutdownExit | FailEntryExit
        | InternalErrorExit | InterruptedExit | UnknownExit)

KVM_EXIT_IO, KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 4, 5, 6
KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR = 8, 9, 10, 17


def _ioctl(fd: int, request: int, arg=0, what: str = "") -> int:
    try:
        return fcntl.ioctl(fd, request, arg, True) if not isinstance(arg, int) \
            else fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmIoctlError(f"{what or hex(request)} failed: {os.strerror(e.errno)}") from e


class _Fd(FdOwner):
    def __init__(self, fd: int):
        self.fd = fd


class Kvm(_Fd):
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist (is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path} (add yourself to the kvm "
                                 "group or run as root)") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        super().__init__(fd)
        self._spare_vm: Vm | None = None
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as e:          # e.g. /dev/null: a device, but not KVM
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device (KVM_GET_API_VERSION: "
                                 f"{e.strerror})") from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path} speaks KVM API {version}, expected {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return fcntl.ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        return _grow_until_fits(lambda n: abi.kvm_cpuid2(n), self.fd, KVM_GET_SUPPORTED_CPUID,
                                "nent", "entries")

    def msr_index_list(self) -> list[int]:
        return _grow_until_fits(lambda n: abi.kvm_msr_list(n), self.fd, KVM_GET_MSR_INDEX_LIST,
                                "nmsrs", "indices")

    def probe(self) -> None:
        """Create a VM, the only reliable test that KVM works (CPU flags lie under nesting);
        it is kept for the next create_vm, which then costs nothing."""
        self._spare_vm = self.create_vm()

    def close(self) -> None:
        if self._spare_vm is not None:
            self._spare_vm.close()
            self._spare_vm = None
        super().close()

    def create_vm(self) -> Vm:
        spare, self._spare_vm = self._spare_vm, None
        if spare is not None:
            return spare
        try:
            fd = fcntl.ioctl(self.fd, KVM_CREATE_VM, 0)
        except OSError as e:
            raise KvmUnavailable(f"KVM_CREATE_VM failed: {e.strerror}") from None
        return Vm(fd, self)


def _grow_until_fits(make, fd: int, request: int, count_field: str, array_field: str) -> list:
    """Call an ioctl that answers E2BIG until its flexible array is large enough."""
    count = 256          # enough for today's CPUID and MSR lists: one call, not two
    while True:
        buf = make(count)
        try:
            fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and count < 1 << 16:
                count *= 4
                continue
            raise KvmIoctlError(f"ioctl {request:#x} failed: {e.strerror}") from None
        array = getattr(buf, array_field)
        return [array[i] for i in range(getattr(buf, count_field))]


class Vm(_Fd):
    def __init__(self, fd: int, kvm: Kvm):
        super().__init__(fd)
        self.kvm = kvm

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               host_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """The slot's dirty bitmap (bit i = page i written since the last call)."""
        bitmap = bytearray(((npages + 63) // 64) * 8)
        holder = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        log = abi.kvm_dirty_log(slot, 0, ctypes.addressof(holder))
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        del holder
        return bitmap

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return Vcpu(fd, self.kvm.vcpu_mmap_size())


class Vcpu(_Fd):
    def __init__(self, fd: int, mmap_size: int):
        super().__init__(fd)
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = abi.kvm_run.from_buffer(self._run_map)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_page
            close_mapping(self._run_map)
        super().close()

    def run(self) -> Exit:
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            return InterruptedExit()
        except OSError as e:
            raise KvmIoctlError(f"KVM_RUN failed: {e.strerror}") from None
        return self._decode_exit()

    def _decode_exit(self) -> Exit:
        run = self.run_page
        reason = run.exit_reason
        if reason == KVM_EXIT_IO:
            io = run.exit.io
            start = io.data_offset
            data = bytes(self._run_map[start:start + io.size * io.count])
            return IoExit(io.port, io.direction == 1, io.size, data)
        if reason == KVM_EXIT_DEBUG:
            d = run.exit.debug
            return DebugExit(d.pc, d.exception, d.dr6)
        if reason == KVM_EXIT_HLT:
            return HltExit()
        if reason == KVM_EXIT_MMIO:
            m = run.exit.mmio
            return MmioExit(m.phys_addr, bool(m.is_write), bytes(m.data[:m.len]))
        if reason == KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.exit.fail_entry.hardware_entry_failure_reason)
        if reason == KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            return InternalErrorExit(internal.suberror,
                                     tuple(internal.data[:min(internal.ndata, 16)]))
        if reason == KVM_EXIT_INTR:
            return InterruptedExit()
        return UnknownExit(reason)

    # -- register state ----------------------------------------------------------------------

    def _get(self, request: int, struct, what: str):
        _ioctl(self.fd, request, struct, what)
        return struct

    def get_regs(self) -> abi.kvm_regs:
        return self._get(KVM_GET_REGS, abi.kvm_regs(), "KVM_GET_REGS")

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(KVM_GET_SREGS, abi.kvm_sregs(), "KVM_GET_SREGS")

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first one it cannot read, so only those are returned."""
        buf = abi.kvm_msrs(len(indices))
        buf.nmsrs = len(indices)
        for entry, index in zip(buf.entries, indices):
            entry.index = index
        count = _ioctl(self.fd, KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs in order; returns how many KVM accepted before the first refusal."""
        buf = abi.kvm_msrs(len(values))
        buf.nmsrs = len(values)
        for entry, (index, value) in zip(buf.entries, values.items()):
            entry.index, entry.data = index, value
        return _ioctl(self.fd, KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_xsave(self, size: int) -> bytes:
        buf = abi.kvm_xsave(size)
        request = KVM_GET_XSAVE2 if size > abi.XSAVE_LEGACY_SIZE else KVM_GET_XSAVE
        _ioctl(self.fd, request, buf, "KVM_GET_XSAVE")
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        if len(data) % 4 or len(data) > abi.XSAVE_MAX_SIZE:
            raise KvmIoctlError(f"KVM_SET_XSAVE: an XSAVE area of {len(data)} bytes is not a "
                                f"whole number of 32-bit words up to {abi.XSAVE_MAX_SIZE}")
        buf = abi.kvm_xsave(max(len(data), abi.XSAVE_LEGACY_SIZE))
        ctypes.memmove(buf, data, len(data))
        _ioctl(self.fd, KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(KVM_GET_XCRS, abi.kvm_xcrs(), "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        _ioctl(self.fd, KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get(KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        _ioctl(self.fd, KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        return self._get(KVM_GET_MP_STATE, abi.kvm_mp_state(), "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, KVM_SET_MP_STATE, abi.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_debugregs(self) -> abi.kvm_debugregs:
        return self._get(KVM_GET_DEBUGREGS, abi.kvm_debugregs(), "KVM_GET_DEBUGREGS")

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        _ioctl(self.fd, KVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS")

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf = abi.kvm_cpuid2(len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self.fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        return _grow_until_fits(lambda n: abi.kvm_cpuid2(n), self.fd, KVM_GET_CPUID2,
                                "nent", "entries")
