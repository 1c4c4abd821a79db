"""One virtual machine: KVM objects, guest memory, vCPU 0 and the VMM's devices, and the run
loop that services the guest's system calls until it exits, faults or is saved."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable

from vmstate import x86
from vmstate.errors import KvmNotAvailableError, RestoreError
from vmstate.pages import bytemap_from_bits, bytemap_from_runs, runs_from_bytemap, union
from vmstate.validate import problems
from vmstate.state import PAGE_SIZE, MemoryRegion, PendingCall, VmmState, VmState

from linux_personality import (
    CallInterrupted, GuestExit, GuestKilled, Personality, SaveRequested)
from linux_personality import signals, snapshot
from linux_personality.address_space import UserAddressSpace
from linux_personality.cpu import GuestFault
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.signals import SignalState

from . import abi, machine, vcpu_state
from .kvm import HltExit, InterruptedExit, Kvm, KvmUnavailable, MmioExit, ShutdownExit, Vcpu
from .memory import GuestMemory
from .stop import StopRequest

SYSRET_RFLAGS_MASK = 0x3C7FD7       # the RFLAGS bits sysretq takes from R11 (RF and VM cleared)
SYSCALL_INSTRUCTION = b"\x0f\x05"
SEGV_MAPERR, SEGV_ACCERR = 1, 2          # si_code of a SIGSEGV: no mapping, no permission
FAULT_FRAME = struct.Struct("<7Q")  # vector, error code, rip, cs, rflags, rsp, ss
KVM_DEVICE_ENV = "VMSTATE_KVM_DEVICE"   # another path for /dev/kvm (tests, odd hosts)
TIMING_ENV = "VMSTATE_TIMING"           # print CLOCK_MONOTONIC marks for the benchmarks


@dataclass(frozen=True)
class Exited:
    status: int


@dataclass(frozen=True)
class Faulted:
    """The guest took an exception (or KVM could not run it); `signal` is what Linux would
    have sent a process, so the command can exit with 128 + signal."""
    report: str
    signal: int


@dataclass(frozen=True)
class Saved:
    """The VM was stopped and its state handed to the save handler, which said where it went
    ("saved to vm_image.sav (...)", "migrated to host:4040: ...")."""
    where: str


Outcome = Exited | Faulted | Saved
SaveHandler = Callable[[VmState, list[memoryview]], str]


SYNC_REGS = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
SEGMENT_BASES = {"fs_base": "fs", "gs_base": "gs"}


def open_kvm() -> Kvm:
    try:
        kvm = Kvm(os.environ.get(KVM_DEVICE_ENV, "/dev/kvm"))
        kvm.create_vm().close()     # the only reliable probe (CPU flags lie under nesting)
    except KvmUnavailable as e:
        raise KvmNotAvailableError(f"KVM is not available: {e}") from None
    if kvm.check_extension(abi.KVM_CAP_SYNC_REGS) & SYNC_REGS != SYNC_REGS:
        raise KvmNotAvailableError("this KVM cannot share registers through kvm_run "
                                   "(KVM_CAP_SYNC_REGS), which the VMM needs")
    return kvm


def timing_mark(label: str) -> None:
    if os.environ.get(TIMING_ENV):
        os.write(2, f"vmstate-timing {label} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}\n"
                 .encode())


class VirtualMachine:
    def __init__(self, kvm: Kvm, memory: GuestMemory):
        """Takes ownership of `memory` (closed with the VM, or now if this fails)."""
        self.kvm = kvm
        self.memory = memory
        try:
            self.vm = kvm.create_vm()
        except BaseException:
            memory.close()
            raise
        try:
            self.vm.set_user_memory_region(0, 0, memory.size, memory.host_address,
                                           abi.KVM_MEM_LOG_DIRTY_PAGES)
            self.vcpu: Vcpu = self.vm.create_vcpu(0)
        except BaseException:
            self.vm.close()
            memory.close()
            raise
        self.vcpu.run_page.kvm_valid_regs = SYNC_REGS
        self.files: FileTable | None = None
        self.address_space: UserAddressSpace | None = None
        self.program, self.argv = "", ()
        self.identity = Identity()
        self.signals = SignalState()
        self.max_file_size: int | None = None
        self.forked_child = False             # this VMM process runs a guest's fork child
        self._msrs: list[int] | None = None
        self._flush_page: mmap.mmap | None = None
        self.star = machine.STAR
        self.refused_msrs: list[int] = []     # MSRs this host would not take on restore
        self.stop = StopRequest(self.vcpu.run_page)
        self._present = bytes(memory.size // PAGE_SIZE)      # pages known present so far

    def close(self) -> None:
        if self.files is not None:
            self.files.close_all()
        self.stop.close()
        self.vcpu.close()
        self.vm.close()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def restore(cls, kvm: Kvm, state: VmState, memory: GuestMemory, root: str) -> VirtualMachine:
        """A blank VM given `state`, over `memory` already holding the guest's memory (an
        image mapped copy-on-write, or memory received from the network). Takes `memory`.
        The caller has checked `state` with check_restorable (it sizes `memory` by it)."""
        region = state.memory[0]
        vm = cls(kvm, memory)
        try:
            vm._present = bytes(bytemap_from_runs(region.present, region.size // PAGE_SIZE))
            aspace = state.vmm.address_space
            vm.address_space = UserAddressSpace(aspace, memory)
            memory.set_user_range(aspace.user_start, aspace.user_end)
            vm.program, vm.argv = state.vmm.program, state.vmm.argv
            vcpu = state.vcpus[0]
            vm.star = vcpu.msr(x86.MSR_STAR, machine.STAR)
            vm.refused_msrs = vcpu_state.apply(vm.vcpu, vcpu)
            vm.files, vm.identity, vm.signals = snapshot.restore(root, state.vmm.files,
                                                                 state.vmm.os)
        except BaseException:
            vm.close()
            raise
        return vm

    # -- running -------------------------------------------------------------------------------

    def run(self, trace=None, save: SaveHandler | None = None,
            gate: Callable[[], None] | None = None) -> Outcome:
        """Run until the guest exits, faults, or is saved through `save`. `gate` is called
        before the VMM acts on the guest's first exit (restore verifies memory there)."""
        syscalls = Personality(KvmCpu(self), self.files, self.address_space,
                               program=self.program, trace=trace, stop_fd=self.stop.cancel_fd,
                               save_enabled=save is not None, max_file_size=self.max_file_size,
                               identity=self.identity, signals=self.signals,
                               reserved_signals=self.stop.watched)
        timing_mark("first-kvm-run")
        try:
            outcome = self._run_loop(syscalls, save, gate)
        finally:
            self.stop.stopped()
            syscalls.close()
        if self.forked_child:
            _end_child_process(outcome)
        return outcome

    def _run_loop(self, syscalls: Personality, save: SaveHandler | None,
                  gate: Callable[[], None] | None) -> Outcome:
        while True:
            exit = self.vcpu.run()
            if gate is not None:
                gate()
                gate = None
                timing_mark("gate-passed")
            match exit:
                case MmioExit(address=machine.DOORBELL_GPA):
                    outcome = self._service_syscall(syscalls, save)
                    if outcome is not None:
                        return outcome
                case HltExit():
                    fault = self._fault()
                    if not self._deliver_fault(syscalls, fault):
                        return fault
                case ShutdownExit():
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"guest triple fault (rip {rip:#x}): it could not even "
                                   "deliver an exception", x86.SIGSEGV)
                case InterruptedExit():
                    if self.stop.requested.is_set() and save is not None:
                        if not self._refuse_save(syscalls):
                            return self._save(save, pending=None)
                case _:
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"unexpected KVM exit {exit} at rip {rip:#x}", x86.SIGSEGV)

    def _service_syscall(self, syscalls: Personality, save: SaveHandler | None
                         ) -> Outcome | None:
        regs = self.vcpu.run_page.s.regs
        nr, args = regs.rax, (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
        try:
            syscalls.serve()
        except GuestExit as e:
            return Exited(e.status)
        except GuestKilled as e:
            name = signal.Signals(e.signal).name if e.signal in signal.valid_signals() \
                else f"signal {e.signal}"
            return Faulted(f"guest killed by {name}", e.signal)
        except SaveRequested:
            if self._refuse_save(syscalls):
                self.return_to_user(-errno.EBUSY)
                return None
            self.return_to_user(0)             # after the restore, syscall(400) returns 0
            return self._save(save, pending=None)
        except CallInterrupted:
            try:
                pending = self._rewind_to_syscall(nr, args)
            except GuestFault:            # not a syscall instruction the guest can re-issue:
                self.return_to_user(-errno.EINTR)      # the call fails as interrupted
                pending = None
            if self._refuse_save(syscalls):
                return None                   # the guest re-issues the call
            return self._save(save, pending=pending)
        return None

    def return_to_user(self, result: int) -> None:
        """Do what `sysretq` would: RAX = result, RIP = RCX, RFLAGS from R11, user CS/SS
        (needed on hardware KVM, where `syscall` entered ring 0; PVM stays in ring 3)."""
        regs = self.vcpu.run_page.s.regs
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        self._leave_syscall_entry(regs.rcx)

    def _rewind_to_syscall(self, nr: int, args: tuple[int, ...]) -> PendingCall:
        """Put the guest back on its `syscall` instruction, so that it re-issues the call
        when it resumes (a blocked read loses no data)."""
        regs = self.vcpu.run_page.s.regs
        rip = regs.rcx - len(SYSCALL_INSTRUCTION)
        if self.memory.read(rip, 2) != SYSCALL_INSTRUCTION:
            raise GuestFault(f"no syscall instruction before {regs.rcx:#x}")
        regs.rax = nr
        self._leave_syscall_entry(rip)
        return PendingCall(nr, args, rip)

    def _leave_syscall_entry(self, rip: int) -> None:
        run = self.vcpu.run_page
        regs, sregs = run.s.regs, run.s.sregs
        regs.rip = rip
        regs.rflags = (regs.r11 & SYSRET_RFLAGS_MASK) | x86.RFLAGS_FIXED
        run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS
        if sregs.cs.dpl != 3:
            cs, ss = machine.user_return_segments(self.star)
            vcpu_state.segment_to_kvm(cs, sregs.cs)
            vcpu_state.segment_to_kvm(ss, sregs.ss)
            run.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS

    def _deliver_fault(self, syscalls: Personality, fault: Faulted) -> bool:
        """If the guest handles the fault's signal, resume it in user mode where it faulted
        and enter its handler (as Linux does); else the fault ends the run."""
        if not signals.handles_fault(syscalls, fault.signal):
            return False
        run = self.vcpu.run_page
        try:
            vector, error_code, rip, cs, rflags, rsp, _ = FAULT_FRAME.unpack(
                self.memory.read_phys(run.s.regs.rsp, FAULT_FRAME.size))
        except GuestFault:
            return False
        if cs & 3 != 3:
            return False                      # the fault was in the guest kernel's stub
        regs, sregs = run.s.regs, run.s.sregs
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
        code, address = ((SEGV_ACCERR if error_code & 1 else SEGV_MAPERR), sregs.cr2) \
            if vector == 14 else (0, rip)
        cs_user, ss_user = machine.user_return_segments(self.star)
        vcpu_state.segment_to_kvm(cs_user, sregs.cs)
        vcpu_state.segment_to_kvm(ss_user, sregs.ss)
        run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
        self.vcpu.set_mp_state(abi.KVM_MP_STATE_RUNNABLE)
        signals.enter_handler(syscalls, fault.signal,
                              struct.pack("<iiiiQ", fault.signal, 0, code, 0, address))
        return True

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
            guard = self.address_space.guard_page if self.address_space else -1
            if guard <= run.s.sregs.cr2 < guard + PAGE_SIZE:
                cause = "the guard page below the stack: a stack overflow"
            report += f", {access} of address {run.s.sregs.cr2:#x} ({cause})"
        elif x86.has_error_code(vector):
            report += f", error code {error_code:#x}"
        report += f", rsp {rsp:#x}" + ("" if cs & 3 == 3 else " (in the guest kernel stub)")
        return Faulted(report, signal)

    # -- saving --------------------------------------------------------------------------------

    def _refuse_save(self, syscalls: Personality) -> bool:
        """A guest with child processes is not saved (a save holds one process): say so, and
        let it run on."""
        if not syscalls.children:
            return False
        pids = ", ".join(str(pid) for pid in sorted(syscalls.children))
        print(f"vmstate: save refused: the guest has child processes ({pids}); an image holds "
              "one process", file=sys.stderr, flush=True)
        self.stop.clear()
        return True

    def flush_page(self) -> int:
        """The host address of a page for protection.flush_tlb's short-lived memory slot."""
        if self._flush_page is None:
            self._flush_page = mmap.mmap(-1, PAGE_SIZE)
            self._flush_anchor = ctypes.c_char.from_buffer(self._flush_page)
        return ctypes.addressof(self._flush_anchor)

    def xsave_size(self) -> int:
        return max(self.kvm.check_extension(abi.KVM_CAP_XSAVE2), abi.XSAVE_LEGACY_SIZE)

    def msr_list(self) -> list[int]:
        if self._msrs is None:
            self._msrs = vcpu_state.msr_indices(self.kvm, self.vcpu)
        return self._msrs

    def _save(self, save: SaveHandler, pending: PendingCall | None) -> Saved:
        timing_mark("save-start")
        self.stop.stopped()
        self.complete_pending_exit()
        where = save(self.capture(pending), [self.memory.view])
        timing_mark("save-done")
        return Saved(where)

    def complete_pending_exit(self) -> None:
        """One KVM_RUN with immediate_exit set: KVM finishes the MMIO exit it is waiting on and
        takes our edited sync registers, then returns without running the guest."""
        run = self.vcpu.run_page
        run.immediate_exit = 1
        exit = self.vcpu.run()
        run.immediate_exit = 0
        if not isinstance(exit, InterruptedExit):
            raise RestoreError(f"the vCPU did not stop for the save ({exit})")

    def capture(self, pending: PendingCall | None = None) -> VmState:
        """The whole VM state. The vCPU must be stopped with no exit pending."""
        vcpu = vcpu_state.capture(self.kvm, self.vcpu, 0, self.msr_list())
        files, guest_os = snapshot.capture(self.files, self.identity, self.signals)
        vmm = VmmState(program=self.program, argv=self.argv, files=files,
                       address_space=self.address_space.state, pending=pending, os=guest_os)
        region = MemoryRegion(0, self.memory.size, runs_from_bytemap(self.present_pages()))
        return VmState(vcpus=(vcpu,), memory=(region,), vmm=vmm)

    def present_pages(self) -> bytes:
        """Pages ever written: by the guest (KVM's dirty log), by the VMM, or present in the
        image this VM was restored from. One byte per page."""
        dirty = self.vm.get_dirty_log(0, self.memory.size // PAGE_SIZE)
        self._present = union(union(self._present, bytemap_from_bits(dirty, len(self._present))),
                              self.memory.vmm_written_pages)
        return self._present


def check_restorable(state: VmState) -> None:
    """This VMM runs one vCPU over one region of memory at guest physical 0."""
    if len(state.vcpus) != 1 or len(state.memory) != 1:
        raise RestoreError(f"the image has {len(state.vcpus)} vCPUs and {len(state.memory)} "
                           "memory regions; this VMM restores 1 vCPU and 1 region")
    region = state.memory[0]
    if region.guest_phys_addr != 0 or region.size % machine.LARGE_PAGE \
            or not machine.USER_START < region.size <= machine.MAX_MEMORY:
        raise RestoreError(f"memory region {region.guest_phys_addr:#x}+{region.size:#x} does "
                           "not fit this VMM's layout")
    aspace = state.vmm.address_space
    if not machine.USER_START <= aspace.user_start <= aspace.user_end <= region.size:
        raise RestoreError(f"user address range {aspace.user_start:#x}-{aspace.user_end:#x} "
                           "lies outside guest memory")
    for problem in problems(state):
        raise RestoreError(problem.message)


def _end_child_process(outcome: Outcome) -> None:
    """A fork child's VMM ends with its guest, as the guest process would have: its exit
    status, or death by the signal that ended it (what the parent's wait4 reports)."""
    sys.stdout.flush()
    if isinstance(outcome, Exited):
        os._exit(outcome.status)
    if isinstance(outcome, Faulted):
        if not outcome.report.startswith("guest killed"):
            print(f"vmstate: {outcome.report}", file=sys.stderr, flush=True)
        signal.signal(outcome.signal, signal.SIG_DFL)
        os.kill(os.getpid(), outcome.signal)
    os._exit(128 + x86.SIGSEGV)


class KvmCpu:
    """The personality's Cpu (linux_personality.cpu) over vCPU 0: registers through the kvm_run
    sync registers (no extra ioctl per system call)."""

    def __init__(self, vm: VirtualMachine):
        self.vm = vm
        self.memory = vm.memory

    @property
    def run(self):
        return self.vm.vcpu.run_page      # a fork child has a vCPU of its own

    def protect(self, addr: int, length: int, prot: int) -> bool:
        from .protection import protect
        return protect(self.vm, addr, length, prot)

    def read_fpu(self) -> bytes:
        return self.vm.vcpu.get_xsave(self.vm.xsave_size())

    def write_fpu(self, data: bytes) -> None:
        self.vm.vcpu.set_xsave(data)

    def fork(self) -> int:
        from .guest_process import fork_vm
        return fork_vm(self.vm)

    def exec(self, host_path: str, argv: list[str], envp: list[str]):
        from .guest_process import exec_program
        return exec_program(self.vm, host_path, argv, envp)

    def read_register(self, name: str) -> int:
        if name in SEGMENT_BASES:
            return getattr(self.run.s.sregs, SEGMENT_BASES[name]).base
        return getattr(self.run.s.regs, name)

    def write_register(self, name: str, value: int) -> None:
        if name in SEGMENT_BASES:
            getattr(self.run.s.sregs, SEGMENT_BASES[name]).base = value
            self.run.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS
        else:
            setattr(self.run.s.regs, name, value & 0xFFFFFFFFFFFFFFFF)
            self.run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS

    def return_to_user(self, result: int) -> None:
        self.vm.return_to_user(result)
