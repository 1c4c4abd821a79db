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
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from vmstate import x86
from vmstate.errors import KvmNotAvailableError, RestoreError
from vmstate.pages import bytemap_from_runs, runs_from_bytemap
from vmstate.state import (
    PAGE_SIZE, GuestLimits, MemoryRegion, PendingCall, VcpuState, VmmState, VmState)

from linux_personality import (
    CallInterrupted, GuestExit, GuestKilled, Personality, SaveRequested)
from linux_personality import signals, snapshot
from linux_personality.address_space import UserAddressSpace
from linux_personality.cpu import GuestFault
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.signals import SignalState

from . import abi, machine, vcpu_state
from .kvm import (
    HltExit, InterruptedExit, Kvm, KvmIoctlError, KvmUnavailable, MmioExit, ShutdownExit, Vcpu)
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


class LiveMigration(Protocol):
    """A live migration under way (kvm_backend/live.py), as the run loop sees it."""
    wants_pause: threading.Event     # the sender is ready for the final stop-and-copy
    finished: threading.Event        # it ended (failed) without stopping the guest

    def hand_over(self, state: VmState, stopped_at: float) -> str | None:
        """The vCPU stopped at `stopped_at` (time.monotonic()): send the rest; where the VM
        went, or None if it failed."""
    def abandon(self, why: str) -> None:
        """The guest ended here first: cancel the migration."""


@dataclass(frozen=True)
class LiveSave:
    """Save by live migration: `begin(vm)` starts sending while the guest runs on."""
    begin: Callable[["VirtualMachine"], LiveMigration]


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
        self.limits = GuestLimits()           # what the user capped the guest at
        self.sleep_left_ns: int | None = None  # a restored pending sleep's time left
        self.forked_child = False             # this VMM process runs a guest's fork child
        self._msrs: list[int] | None = None
        self._flush_page: mmap.mmap | None = None
        self.star = machine.STAR
        self.refused_msrs: list[int] = []     # MSRs this host would not take on restore
        self.stop = StopRequest(self.vcpu.run_page)
        self.name = "vm"                      # tags its para-call output and its lines on a host
        self._present = np.zeros(memory.size // PAGE_SIZE, np.uint8)   # pages present so far
        self._unsent: np.ndarray | None = None    # written since a live migration took them
        self._written_lock = threading.Lock()
        self.migration: LiveMigration | None = None
        self._running: _Running | None = None
        self.serving: int | None = None       # the system call being served, if any

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
            vm._present = np.frombuffer(
                bytemap_from_runs(region.present, region.size // PAGE_SIZE), np.uint8)
            aspace = state.vmm.address_space
            vm.address_space = UserAddressSpace(aspace, memory)
            memory.set_user_range(aspace.user_start, aspace.user_end)
            vm.program, vm.argv = state.vmm.program, state.vmm.argv
            vm.name = os.path.basename(vm.program) or "vm"
            vcpu = state.vcpus[0]
            vm.star = vcpu.msr(x86.MSR_STAR, machine.STAR)
            vm.refused_msrs = vcpu_state.apply(vm.vcpu, vcpu)
            vm.limits = state.vmm.limits or GuestLimits()
            vm.sleep_left_ns = state.vmm.sleep_left_ns
            vm.files, vm.identity, vm.signals = snapshot.restore(
                root, state.vmm.files, state.vmm.os, vm.limits.max_fds)
        except BaseException:
            vm.close()
            raise
        return vm

    # -- running -------------------------------------------------------------------------------

    def run(self, trace=None, save: SaveHandler | None = None,
            gate: Callable[[], None] | None = None, paracalls=None) -> Outcome:
        """Run until the guest exits, faults, or is saved through `save`. `gate` is called
        before the VMM acts on the guest's first exit (restore verifies memory there)."""
        self.start(trace, save, gate, paracalls)
        try:
            while (outcome := self.run_slice()) is None:
                pass
        finally:
            self.stop.stopped()
            self.abandon_migration("the guest ended on this host first")
            self._running.syscalls.close()
        if self.forked_child:
            _end_child_process(outcome)
        return outcome

    def start(self, trace=None, save: SaveHandler | None = None,
              gate: Callable[[], None] | None = None, paracalls=None) -> None:
        """Make the VM ready for run_slice (run does this itself). `paracalls` serves
        syscalls 401-403 (default: a ParaCalls with default migration options)."""
        from .paracalls import ParaCalls
        syscalls = Personality(KvmCpu(self), self.files, self.address_space,
                               program=self.program, trace=trace, stop_fd=self.stop.cancel_fd,
                               save_enabled=save is not None,
                               max_file_size=self.limits.max_file_size,
                               max_processes=self.limits.max_processes,
                               sleep_left_ns=self.sleep_left_ns, identity=self.identity, signals=self.signals,
                               reserved_signals=self.stop.watched)
        self._running = _Running(syscalls, save, gate, paracalls or ParaCalls(self))
        timing_mark("first-kvm-run")

    def begin_slice(self, seconds: float, instructions: int | None) -> None:
        """A multi-VM host's slice begins (it ends it with end_slice, from SIGALRM)."""
        self.vcpu.run_page.immediate_exit = 0

    def end_slice(self) -> None:
        self.vcpu.run_page.immediate_exit = 1

    def run_slice(self) -> Outcome | None:
        """Run the vCPU until the guest ends (its Outcome) or KVM_RUN is interrupted by a
        signal with no stop requested (None: a time slice ended; call again to go on)."""
        running = self._running
        while True:
            exit = self.vcpu.run()
            if running.gate is not None:
                running.gate()
                running.gate = None
                timing_mark("gate-passed")
            match exit:
                case MmioExit(address=machine.DOORBELL_GPA):
                    outcome = self._service_syscall(running)
                    if outcome is not None:
                        return outcome
                case MmioExit(address=machine.SPARE_DOORBELL_GPA):
                    pass         # nothing to do: the round-trip benchmark's baseline
                case HltExit():
                    fault = self._fault()
                    if not self._deliver_fault(running.syscalls, fault):
                        return fault
                case ShutdownExit():
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"guest triple fault (rip {rip:#x}): it could not even "
                                   "deliver an exception", x86.SIGSEGV)
                case InterruptedExit():
                    if self.stop.requested.is_set() and running.save is not None:
                        if self._refuse_save(running.syscalls):
                            return None
                        outcome = self._on_stop(running.save, pending=None)
                        if outcome is not None:
                            return outcome
                    return None
                case _:
                    rip = self.vcpu.run_page.s.regs.rip
                    return Faulted(f"unexpected KVM exit {exit} at rip {rip:#x}", x86.SIGSEGV)

    def _service_syscall(self, running: _Running) -> Outcome | None:
        regs = self.vcpu.run_page.s.regs
        nr, args = regs.rax, (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
        save = running.save
        if running.paracalls.serves(nr):
            return running.paracalls.serve(nr, args, running.syscalls.trace)
        self.serving = nr
        try:
            running.syscalls.serve()
        except GuestExit as e:
            return Exited(e.status)
        except GuestKilled as e:
            name = signal.Signals(e.signal).name if e.signal in signal.valid_signals() \
                else f"signal {e.signal}"
            return Faulted(f"guest killed by {name}", e.signal)
        except SaveRequested:
            if self._refuse_save(running.syscalls):
                self.return_to_user(-errno.EBUSY)
                return None
            self.return_to_user(0)             # after the restore, syscall(400) returns 0
            if isinstance(save, LiveSave):
                self._begin_live(save)
                return None
            return self._save(save, pending=None)
        except CallInterrupted:
            try:
                pending = self._rewind_to_syscall(nr, args)
            except GuestFault:            # not a syscall instruction the guest can re-issue:
                self.return_to_user(-errno.EINTR)      # the call fails as interrupted
                pending = None
            if not self.stop.requested.is_set():       # a time slice ended (stop.interrupt_call)
                self.vcpu.run_page.immediate_exit = 1  # the next KVM_RUN takes the registers
                return None                            # and returns: run_slice gives None
            if self._refuse_save(running.syscalls):
                return None                   # the guest re-issues the call
            return self._on_stop(save, pending)
        finally:
            self.serving = None
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
        try:
            signals.enter_handler(syscalls, fault.signal,
                                  struct.pack("<iiiiQ", fault.signal, 0, code, 0, address))
        except GuestKilled:           # no room for the handler's frame: the fault ends the run
            return False
        return True

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

    # -- saving --------------------------------------------------------------------------------

    def _refuse_save(self, syscalls: Personality) -> bool:
        """A guest with child processes is not saved (a save holds one process): say so, and
        let it run on."""
        if not syscalls.children:
            return False
        pids = ", ".join(str(pid) for pid in sorted(syscalls.children))
        print(f"vmstate: save refused: the guest has child processes ({pids}); an image holds "
              "one process", file=sys.stderr, flush=True)
        self.stop.reset()
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

    def _on_stop(self, save, pending: PendingCall | None) -> Outcome | None:
        """A stop request reached the run loop (a signal, or a live migration's last round,
        whatever started it); None: the guest carries on (a rewound call is re-issued)."""
        if self.migration is not None and self.migration.wants_pause.is_set():
            self.stop.reset()             # before the hand-over: a request from now on is kept
            return self._final_copy(pending)
        if not isinstance(save, LiveSave):
            return self._save(save, pending)
        self.stop.reset()
        self._begin_live(save)
        return None

    def begin_live_migration(self, save: LiveSave) -> None:
        """Start a live migration now, whatever the VM's own save does (the control socket's
        `migrate live=true`, para-call 403 under --live): the guest runs on; the run loop
        ends the VM with Saved once the receiver has it, or goes on if the migration fails."""
        self._begin_live(save)

    def abandon_migration(self, why: str) -> None:
        if self.migration is not None:
            self.migration.abandon(why)
            self.migration = None

    def _begin_live(self, save: LiveSave) -> None:
        if self.migration is not None and not self.migration.finished.is_set():
            return                        # one at a time: this request joins it
        self.migration = save.begin(self)

    def _final_copy(self, pending: PendingCall | None) -> Outcome | None:
        """Stop the guest for the live migration's last pages and state. If the migration
        then fails, the guest carries on here as if nothing happened."""
        timing_mark("save-start")
        stopped_at = time.monotonic()
        self.stop.stopped()
        self.complete_pending_exit()
        migration, self.migration = self.migration, None
        where = migration.hand_over(self.capture(pending), stopped_at)
        self.stop.reset()
        if where is None:
            timing_mark("resumed-here")
            return None
        timing_mark("save-done")
        return Saved(where)

    def _save(self, save: SaveHandler, pending: PendingCall | None) -> Saved:
        timing_mark("save-start")
        self.stop.stopped()
        self.complete_pending_exit()
        where = save(self.capture(pending), [self.memory.view])
        timing_mark("save-done")
        return Saved(where)

    def settle(self, result: int) -> None:
        """Finish the system call the vCPU stopped on with `result` and leave the vCPU stopped
        with no exit pending, so that capture() sees the guest as it resumes; the VM goes on
        at the next run_slice (return_to_user may still change the result it sees)."""
        self.return_to_user(result)
        self.complete_pending_exit()

    def pause(self) -> None:
        """Between slices: leave the vCPU with no exit pending and the registers the run loop
        edited taken, so that capture() or a save sees the guest as it will resume."""
        self.complete_pending_exit()

    def save_now(self, save: SaveHandler) -> Saved:
        """Save the VM between slices through `save`; it ends."""
        return self._save(save, pending=None)

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

    def capture(self, pending: PendingCall | None = None) -> VmState:
        """The whole VM state. The vCPU must be stopped with no exit pending."""
        vcpu = self.capture_vcpu()
        files, guest_os = snapshot.capture(self.files, self.identity, self.signals)
        vmm = VmmState(program=self.program, argv=self.argv, files=files,
                       address_space=self.address_space.state, pending=pending, os=guest_os,
                       saved_by="kvm", limits=self.limits,
                       sleep_left_ns=None if pending is None or self._running is None
                       else self._running.syscalls.sleep_left_ns)
        region = MemoryRegion(0, self.memory.size, runs_from_bytemap(self.present_pages()))
        return VmState(vcpus=(vcpu,), memory=(region,), vmm=vmm)

    def present_pages(self) -> np.ndarray:
        """Pages ever written: by the guest (KVM's dirty log), by the VMM, or present in the
        image this VM was restored from. One byte per page."""
        self._collect_written()
        return self._present

    def start_tracking(self) -> np.ndarray:
        """Keep the pages written from now on for take_dirty; the pages present now."""
        present = self.present_pages().copy()
        with self._written_lock:
            self._unsent = np.zeros(len(self._present), np.uint8)
        return present

    def take_dirty(self) -> np.ndarray:
        """Pages written since start_tracking or the previous call (one byte per page)."""
        self._collect_written()
        with self._written_lock:
            taken, self._unsent = self._unsent, np.zeros(len(self._present), np.uint8)
        return taken

    def stop_tracking(self) -> None:
        with self._written_lock:
            self._unsent = None

    def _collect_written(self) -> None:
        """Fold the pages written since the last look (KVM's dirty log, which reading
        clears, and the VMM's own writes) into the present set and the unsent set."""
        with self._written_lock:
            pages = len(self._present)
            bits = np.frombuffer(self.vm.get_dirty_log(0, pages), np.uint8)
            written = np.unpackbits(bits, bitorder="little")[:pages]
            written |= np.frombuffer(self.memory.take_written(), np.uint8)
            self._present |= written
            if self._unsent is not None:
                self._unsent |= written


def describe_fault(vector: int, error_code: int, rip: int, rsp: int, in_user: bool,
                   address: int, guard_page: int | None = None) -> Faulted:
    """The report and signal for a guest exception, the same whichever CPU ran the guest
    (`address` is the faulting address of a page fault, `guard_page` the page below the
    stack, whose faults are a stack overflow)."""
    mnemonic, name, _, signal = x86.EXCEPTIONS.get(vector, (f"#{vector}", "exception", 0,
                                                             x86.SIGSEGV))
    report = f"guest fault: {mnemonic} {name} (vector {vector}) at rip {rip:#x}"
    if vector == 14:
        access = "write" if error_code & 2 else ("instruction fetch" if error_code & 16
                                                 else "read")
        cause = "protection violation" if error_code & 1 else "page not present"
        if guard_page is not None and guard_page <= address < guard_page + PAGE_SIZE:
            cause = "the guard page below the stack: a stack overflow"
        report += f", {access} of address {address:#x} ({cause})"
    elif x86.has_error_code(vector):
        report += f", error code {error_code:#x}"
    report += f", rsp {rsp:#x}" + ("" if in_user else " (in the guest kernel stub)")
    return Faulted(report, signal)


@dataclass
class _Running:
    """What the run loop of a started VM works with."""
    syscalls: Personality
    save: SaveHandler | None
    gate: Callable[[], None] | None
    paracalls: object              # paracalls.ParaCalls (imported late: it imports this module)


def check_restorable(state: VmState) -> None:
    """What join also checks before it writes (vmstate.validate.restore_problems)."""
    from vmstate.validate import restore_problems      # only restores need the checks
    for problem in restore_problems(state):
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
        from .protection import flush_tlb, protect
        return protect(self.vm.memory, addr, length, prot, lambda: flush_tlb(self.vm))

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
