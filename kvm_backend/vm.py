"""One virtual machine on KVM: the KVM objects, vCPU 0 and the run loop that services the
guest's system calls (the CPU-independent rest is machine.base.Machine)."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import threading

from typing import TYPE_CHECKING

from vmstate import x86
from vmstate.errors import KvmNotAvailableError, RestoreError
from vmstate.state import PAGE_SIZE, PendingCall, VcpuState

from linux_personality import GuestKilled
from linux_personality.cpu import GuestFault
from linux_personality.options import GuestOptions
from machine import layout
from machine.base import SLICE_ENDED, Machine, StopHere
from machine.boot import boot_vcpu_state, load_guest
from machine.loader import inspect_program
from machine.memory import GuestMemory
from machine.outcome import Faulted, Outcome, describe_fault
from machine.stop import StopRequest

from . import abi, vcpu_state
from .kvm import (
    HltExit, InterruptedExit, Kvm, KvmIoctlError, KvmUnavailable, MmioExit, ShutdownExit, Vcpu)

if TYPE_CHECKING:      # numpy is imported where the pages are looked at: it doubles start-up
    import numpy as np

SYSRET_RFLAGS_MASK = 0x3C7FD7       # the RFLAGS bits sysretq takes from R11 (RF and VM cleared)
SYSCALL_INSTRUCTION = b"\x0f\x05"
FAULT_FRAME = struct.Struct("<7Q")  # vector, error code, rip, cs, rflags, rsp, ss
KVM_DEVICE_ENV = "VMSTATE_KVM_DEVICE"   # another path for /dev/kvm (tests, odd hosts)
FLUSH_SLOT, FLUSH_GPA = 1, layout.MAX_MEMORY + (1 << 30)   # far from memory and the doorbell


SYNC_REGS = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
SEGMENT_BASES = {"fs_base": "fs", "gs_base": "gs"}


def open_kvm() -> Kvm:
    try:
        kvm = Kvm(os.environ.get(KVM_DEVICE_ENV, "/dev/kvm"))
        kvm.probe()
    except KvmUnavailable as e:
        raise KvmNotAvailableError(f"KVM is not available: {e}") from None
    if kvm.check_extension(abi.KVM_CAP_SYNC_REGS) & SYNC_REGS != SYNC_REGS:
        raise KvmNotAvailableError("this KVM cannot share registers through kvm_run "
                                   "(KVM_CAP_SYNC_REGS), which the VMM needs")
    return kvm


class VirtualMachine(Machine):
    saved_by = "kvm"

    def __init__(self, kvm: Kvm, memory: GuestMemory):
        """Takes ownership of `memory` (closed with the VM, or now if this fails)."""
        super().__init__(memory)
        self.kvm = kvm
        try:
            self.vm = kvm.create_vm()
        except BaseException:
            memory.close()
            raise
        try:
            self.attach_vcpu()
        except BaseException:
            self.vm.close()
            memory.close()
            raise
        self.cpu = KvmCpu(self)
        self.stop = StopRequest(self.vcpu.run_page)
        self._msrs: list[int] | None = None
        self._flush_page: mmap.mmap | None = None
        self.star = layout.STAR
        self._present: np.ndarray | None = None   # pages present so far, one byte each
        self._unsent: np.ndarray | None = None    # written since a live migration took them
        self._written_lock = threading.Lock()

    def attach_vcpu(self) -> None:
        """Give the (new) KVM VM the guest's memory, with dirty logging, and vCPU 0 with its
        registers synced through the run page (a fork child does this in its own VM)."""
        self.vm.set_user_memory_region(0, 0, self.memory.size, self.memory.host_address,
                                       abi.KVM_MEM_LOG_DIRTY_PAGES)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        self.vcpu.run_page.kvm_valid_regs = SYNC_REGS

    def _close_cpu(self) -> None:
        self.vcpu.close()
        self.vm.close()

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def boot(cls, kvm: Kvm, program_path: str, argv: list[str], memory_size: int,
             root: str, options: GuestOptions = GuestOptions()) -> VirtualMachine:
        """A VM about to run `program_path`'s first instruction, in ring 3."""
        program = inspect_program(program_path)
        vm = cls(kvm, GuestMemory(memory_size))
        try:
            rsp = load_guest(vm, program, argv, root, options)
            apic_base = vm.vcpu.get_sregs().apic_base
            vcpu_state.apply(vm.vcpu, boot_vcpu_state(
                program, rsp, apic_base, vcpu_state.cpuid_from_kvm(kvm.supported_cpuid())))
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def restore(cls, kvm: Kvm, state, memory: GuestMemory, root: str) -> VirtualMachine:
        """A blank VM given `state`, over `memory` already holding the guest's memory (an
        image mapped copy-on-write, or memory received from the network). Takes `memory`.
        The caller has checked `state` with check_restorable (it sizes `memory` by it)."""
        vm = cls(kvm, memory)
        vm._restore(state, root)
        return vm

    def _enter_vcpu(self, vcpu: VcpuState) -> None:
        self.star = vcpu.msr(x86.MSR_STAR, layout.STAR)
        self.refused_msrs = vcpu_state.apply(self.vcpu, vcpu)

    # -- running -------------------------------------------------------------------------------

    def begin_slice(self, seconds: float, instructions: int | None) -> None:
        """A multi-VM host's slice begins (it ends it with end_slice, from SIGALRM)."""
        self.vcpu.run_page.immediate_exit = 0

    def end_slice(self) -> None:
        self.vcpu.run_page.immediate_exit = 1

    def run_slice(self) -> Outcome | None:
        """Run the vCPU until the guest ends (its Outcome) or KVM_RUN is interrupted by a
        signal with no stop requested (None: a time slice ended; call again to go on)."""
        while True:
            exit = self.vcpu.run()
            self._pass_gate()
            match exit:
                case MmioExit(address=layout.DOORBELL_GPA):
                    outcome = self._service_syscall()
                    if outcome is not None:
                        return outcome
                case MmioExit(address=layout.SPARE_DOORBELL_GPA):
                    pass         # nothing to do: the round-trip benchmark's baseline
                case HltExit():
                    fault = self._fault()
                    if not self._deliver_fault(fault):
                        return fault
                case ShutdownExit():
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"guest triple fault (rip {rip:#x}): it could not even "
                                   "deliver an exception", x86.SIGSEGV)
                case InterruptedExit():
                    if self.stop.requested.is_set() and self._running.save is not None:
                        return self._stop_requested()
                    return None
                case _:
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"unexpected KVM exit {exit} at rip {rip:#x}", x86.SIGSEGV)

    def _service_syscall(self) -> Outcome | None:
        regs = self.vcpu.run_page.s.regs
        served = self._serve_syscall(regs.rax, (regs.rdi, regs.rsi, regs.rdx, regs.r10,
                                                regs.r8, regs.r9))
        if served is SLICE_ENDED:
            self.vcpu.run_page.immediate_exit = 1  # the next KVM_RUN takes the registers
            return None                            # and returns: run_slice gives None
        if isinstance(served, StopHere):
            return self._on_stop(self._running.save, served.pending)
        return served

    def return_to_user(self, result: int) -> None:
        """Do what `sysretq` would: RAX = result, RIP = RCX, RFLAGS from R11, user CS/SS
        (needed on hardware KVM, where `syscall` entered ring 0; PVM stays in ring 3)."""
        regs = self.vcpu.run_page.s.regs
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        self._leave_syscall_entry(regs.rcx)

    def _rewind_to_syscall(self, nr: int, args: tuple[int, ...]) -> PendingCall | None:
        regs = self.vcpu.run_page.s.regs
        rip = regs.rcx - len(SYSCALL_INSTRUCTION)
        try:
            if self.memory.read(rip, 2) != SYSCALL_INSTRUCTION:
                return None
        except GuestFault:
            return None
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
            self.enter_user_segments()

    def enter_user_segments(self) -> None:
        """Put the user CS and SS (as sysretq would load them) in the run page's sregs."""
        sregs = self.vcpu.run_page.s.sregs
        cs, ss = layout.user_return_segments(self.star)
        vcpu_state.segment_to_kvm(cs, sregs.cs)
        vcpu_state.segment_to_kvm(ss, sregs.ss)
        self.vcpu.run_page.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS

    def _deliver_fault(self, fault: Faulted) -> bool:
        """If the guest handles the fault's signal, resume it in user mode where it faulted
        and enter its handler (as Linux does); else the fault ends the run."""
        if not self._handles_fault(fault):
            return False
        run = self.vcpu.run_page
        try:
            vector, error_code, rip, cs, rflags, rsp, _ = FAULT_FRAME.unpack(
                self.memory.read_phys(run.s.regs.rsp, FAULT_FRAME.size))
        except GuestFault:
            return False
        if cs & 3 != 3:
            return False                      # the fault was in the guest kernel's stub
        regs = run.s.regs
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
        run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS
        self.enter_user_segments()
        self.vcpu.set_mp_state(abi.KVM_MP_STATE_RUNNABLE)
        return self._enter_handler(fault, vector, error_code,
                                   run.s.sregs.cr2 if vector == 14 else rip)

    def _fault(self) -> Faulted:
        """An exception stub halted: decode the frame it left on the exception stack."""
        run = self.vcpu.run_page
        try:
            frame = FAULT_FRAME.unpack(self.memory.read_phys(run.s.regs.rsp, FAULT_FRAME.size))
        except Exception:
            return Faulted(f"guest halted in ring 0 at rip {run.s.regs.rip:#x}", x86.SIGSEGV)
        vector, error_code, rip, cs, _, rsp, _ = frame
        guard = self.address_space.guard_page if self.address_space else None
        return describe_fault(vector, error_code, rip, rsp, cs & 3 == 3, run.s.sregs.cr2, guard)

    # -- the guest's page tables ---------------------------------------------------------------

    def forget_translations(self) -> None:
        """Make the vCPU see page-table edits the VMM made through its own mapping. Shadow
        paging (KVM-PVM) keeps shadow copies of guest page tables that such writes do not
        invalidate, and a CR3 reload does not drop them; deleting a memory slot makes KVM zap
        every shadow page and flush the TLBs (with EPT too). So: add a one-page slot, delete
        it."""
        if self._flush_page is None:
            self._flush_page = mmap.mmap(-1, PAGE_SIZE)
            self._flush_anchor = ctypes.c_char.from_buffer(self._flush_page)
        page = ctypes.addressof(self._flush_anchor)
        self.vm.set_user_memory_region(FLUSH_SLOT, FLUSH_GPA, PAGE_SIZE, page, 0)
        self.vm.set_user_memory_region(FLUSH_SLOT, FLUSH_GPA, 0, page, 0)

    # -- saving --------------------------------------------------------------------------------

    def xsave_size(self) -> int:
        return max(self.kvm.check_extension(abi.KVM_CAP_XSAVE2), abi.XSAVE_LEGACY_SIZE)

    def msr_list(self) -> list[int]:
        if self._msrs is None:
            self._msrs = vcpu_state.msr_indices(self.kvm, self.vcpu)
        return self._msrs

    def pause(self) -> None:
        """Between slices: leave the vCPU with no exit pending and the registers the run loop
        edited taken, so that capture() or a save sees the guest as it will resume."""
        self.complete_pending_exit()

    def complete_pending_exit(self) -> None:
        """One KVM_RUN with immediate_exit set: KVM finishes the MMIO exit it is waiting on and
        takes our edited sync registers, then returns without running the guest."""
        run = self.vcpu.run_page
        run.immediate_exit = 1
        exit = self.vcpu.run()
        run.immediate_exit = 0
        if not isinstance(exit, InterruptedExit):
            raise RestoreError(f"the vCPU did not stop for the save ({exit})")

    def capture_vcpu(self) -> VcpuState:
        """vCPU 0's state alone (stopped, no exit pending)."""
        return vcpu_state.capture(self.kvm, self.vcpu, 0, self.msr_list())

    @property
    def _page_count(self) -> int:
        return self.memory.size // PAGE_SIZE

    def present_pages(self) -> np.ndarray:
        """Pages ever written: by the guest (KVM's dirty log), by the VMM, or present in the
        image this VM was restored from. One byte per page."""
        import numpy as np
        self._collect_written()
        return np.frombuffer(self._present, np.uint8)

    def start_tracking(self) -> np.ndarray:
        """Keep the pages written from now on for take_dirty; the pages present now."""
        import numpy as np
        present = self.present_pages().copy()
        with self._written_lock:
            self._unsent = np.zeros(self._page_count, np.uint8)
        return present

    def take_dirty(self) -> np.ndarray:
        """Pages written since start_tracking or the previous call (one byte per page)."""
        import numpy as np
        self._collect_written()
        with self._written_lock:
            taken, self._unsent = self._unsent, np.zeros(self._page_count, np.uint8)
        return taken

    def stop_tracking(self) -> None:
        with self._written_lock:
            self._unsent = None

    def _collect_written(self) -> None:
        """Fold the pages written since the last look (KVM's dirty log, which reading
        clears, and the VMM's own writes) into the present set and the unsent set."""
        import numpy as np
        with self._written_lock:
            pages = self._page_count
            if self._present is None:
                self._present = np.frombuffer(bytearray(self._image_bytemap()), np.uint8)
            bits = np.frombuffer(self.vm.get_dirty_log(0, pages), np.uint8)
            written = np.unpackbits(bits, bitorder="little")[:pages]
            written |= np.frombuffer(self.memory.take_written(), np.uint8)
            present = np.frombuffer(self._present, np.uint8)    # a view: writes land there
            present |= written
            if self._unsent is not None:
                self._unsent |= written


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
        from machine.protection import protect
        return protect(self.vm.memory, addr, length, prot, self.vm.forget_translations)

    def read_fpu(self) -> bytes:
        return self.vm.vcpu.get_xsave(self.vm.xsave_size())

    def write_fpu(self, data: bytes) -> None:
        """GuestKilled(SIGSEGV) if KVM refuses the state (a signal frame the guest corrupted:
        Linux's rt_sigreturn kills the process then too)."""
        try:
            self.vm.vcpu.set_xsave(data)
        except KvmIoctlError:
            raise GuestKilled(signal.SIGSEGV) from None

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
