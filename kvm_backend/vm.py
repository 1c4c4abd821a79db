"""One virtual machine: KVM objects, guest memory, vCPU 0 and the VMM's devices, and the run
loop that services the guest's system calls until it exits, faults or is stopped."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vmstate import x86
from vmstate.errors import KvmNotAvailableError
from vmstate.state import VcpuState

from . import abi, machine, vcpu_state
from .address_space import UserAddressSpace
from .files import FileTable
from .kvm import (
    HltExit, InterruptedExit, Kvm, KvmUnavailable, MmioExit, ShutdownExit, Vcpu)
from .loader import build_stack, heap_start, inspect_program, load_program
from .memory import GuestMemory
from .syscalls import GuestExit, LinuxSyscalls

SYSRET_RFLAGS_MASK = 0x3C7FD7     # the RFLAGS bits sysretq takes from R11 (RF and VM cleared)
FAULT_FRAME = struct.Struct("<7Q")  # vector, error code, rip, cs, rflags, rsp, ss


@dataclass(frozen=True)
class Exited:
    status: int


@dataclass(frozen=True)
class Faulted:
    """The guest took an exception (or KVM could not run it); `signal` is what Linux would
    have sent a process, so the command can exit with 128 + signal."""
    report: str
    signal: int


Outcome = Exited | Faulted


KVM_DEVICE_ENV = "VMSTATE_KVM_DEVICE"    # another path for /dev/kvm (tests, odd hosts)


def open_kvm() -> Kvm:
    try:
        kvm = Kvm(os.environ.get(KVM_DEVICE_ENV, "/dev/kvm"))
        kvm.create_vm().close()     # the only reliable probe (CPU flags lie under nesting)
        return kvm
    except KvmUnavailable as e:
        raise KvmNotAvailableError(f"KVM is not available: {e}") from None


class VirtualMachine:
    def __init__(self, kvm: Kvm, memory_size: int, memory: GuestMemory | None = None):
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.memory = memory or GuestMemory(memory_size)
        self.vm.set_user_memory_region(0, 0, self.memory.size, self.memory.host_address,
                                       abi.KVM_MEM_LOG_DIRTY_PAGES)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        self.files: FileTable | None = None
        self.address_space: UserAddressSpace | None = None
        self.star = machine.STAR
        run = self.vcpu.run_page
        run.kvm_valid_regs = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS

    def close(self) -> None:
        if self.files is not None:
            self.files.close_all()
        self.vcpu.close()
        self.vm.close()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def boot(cls, kvm: Kvm, program_path: str, argv: list[str], memory_size: int,
             root: str) -> VirtualMachine:
        """A VM about to run `program_path`'s first instruction, in ring 3."""
        program = inspect_program(program_path)
        vm = cls(kvm, memory_size)
        try:
            for addr, data in machine.boot_structures(memory_size):
                vm.memory.write_phys(addr, data)
            vm.address_space = UserAddressSpace.fresh(vm.memory, machine.USER_START,
                                                      heap_start(program))
            vm.memory.set_user_range(machine.USER_START, vm.address_space.state.user_end)
            load_program(program, vm.memory, vm.address_space.state.mmap_top)
            rsp = build_stack(vm.memory, program, argv, vm.address_space.stack_top)
            vm.files = FileTable.with_stdio(root)
            apic_base = vm.vcpu.get_sregs().apic_base
            vcpu_state.apply(vm.vcpu, VcpuState(
                regs=machine.boot_registers(program.entry, rsp),
                sregs=machine.boot_sregs(apic_base), msrs=machine.BOOT_MSRS,
                cpuid=vcpu_state.cpuid_from_kvm(kvm.supported_cpuid()),
                mp_state=abi.KVM_MP_STATE_RUNNABLE))
        except BaseException:
            vm.close()
            raise
        return vm

    # -- running -------------------------------------------------------------------------------

    def run(self, trace=None) -> Outcome:
        syscalls = LinuxSyscalls(self.memory, self.files, self.address_space, _SyncedCpu(self),
                                 trace=trace)
        while True:
            exit = self.vcpu.run()
            match exit:
                case MmioExit(address=machine.DOORBELL_GPA):
                    outcome = self._service_syscall(syscalls)
                    if outcome is not None:
                        return outcome
                case HltExit():
                    return self._fault()
                case ShutdownExit():
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"guest triple fault (rip {rip:#x}): it could not even "
                                   "deliver an exception", x86.SIGSEGV)
                case InterruptedExit():
                    continue
                case _:
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"unexpected KVM exit {exit} at rip {rip:#x}", x86.SIGSEGV)

    def _service_syscall(self, syscalls: LinuxSyscalls) -> Outcome | None:
        regs = self.vcpu.run_page.s.regs
        args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
        try:
            result = syscalls.dispatch(regs.rax, args)
        except GuestExit as e:
            return Exited(e.status)
        self._return_to_user(result)
        return None

    def _return_to_user(self, result: int) -> None:
        """Do what `sysretq` would: RAX = result, RIP = RCX, RFLAGS from R11, user CS/SS
        (needed on hardware KVM, where `syscall` entered ring 0; PVM stays in ring 3)."""
        run = self.vcpu.run_page
        regs, sregs = run.s.regs, run.s.sregs
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        regs.rip = regs.rcx
        regs.rflags = (regs.r11 & SYSRET_RFLAGS_MASK) | x86.RFLAGS_FIXED
        run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS
        if sregs.cs.dpl != 3:
            cs, ss = machine.user_return_segments(self.star)
            vcpu_state.segment_to_kvm(cs, sregs.cs)
            vcpu_state.segment_to_kvm(ss, sregs.ss)
            run.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS

    def _fault(self) -> Faulted:
        """An exception stub halted: decode the frame it left on the exception stack."""
        run = self.vcpu.run_page
        try:
            frame = FAULT_FRAME.unpack(self.memory.read_phys(run.s.regs.rsp, FAULT_FRAME.size))
        except Exception:
            return Faulted(f"guest halted in ring 0 at rip {run.s.regs.rip:#x}", x86.SIGSEGV)
        vector, error_code, rip, cs, _, rsp, _ = frame
        mnemonic, name, _, signal = x86.EXCEPTIONS.get(vector, (f"#{vector}", "exception", 0,
                                                                 x86.SIGSEGV))
        report = f"guest fault: {mnemonic} {name} (vector {vector}) at rip {rip:#x}"
        if vector == 14:
            access = "write" if error_code & 2 else ("instruction fetch" if error_code & 16
                                                     else "read")
            cause = "protection violation" if error_code & 1 else "page not present"
            report += f", {access} of address {run.s.sregs.cr2:#x} ({cause})"
        elif x86.has_error_code(vector):
            report += f", error code {error_code:#x}"
        report += f", rsp {rsp:#x}" + ("" if cs & 3 == 3 else " (in the guest kernel stub)")
        return Faulted(report, signal)


class _SyncedCpu:
    """FS/GS bases through the kvm_run sync registers (no extra ioctl per system call)."""

    def __init__(self, vm: VirtualMachine):
        self.run = vm.vcpu.run_page

    def segment_base(self, name: str) -> int:
        return getattr(self.run.s.sregs, name).base

    def set_segment_base(self, name: str, value: int) -> None:
        getattr(self.run.s.sregs, name).base = value
        self.run.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS
