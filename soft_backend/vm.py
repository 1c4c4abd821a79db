"""One virtual machine on the software CPU: unicorn over the VMM's guest memory (the same
mapping KVM would use, zero-copy), the guest in ring 3 under its own page tables, and the run
loop that serves its system calls until it exits, faults, is saved, or has run a given number
of instructions.

The CPU-independent rest (the personality's state, restore, capture, saves, the run loop's
shape) is machine.base.Machine, as for KVM, so images, saves and migrations are the same.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from unicorn import (
    UC_ARCH_X86, UC_ERR_INSN_INVALID, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc,
    UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from linux_personality.address_space import UserAddressSpace
from linux_personality.options import GuestOptions
from machine.base import SLICE_ENDED, Machine, StopHere
from machine.boot import boot_vcpu_state, load_guest, load_new_program
from machine.loader import inspect_program
from machine.memory import GuestMemory
from machine.outcome import Exited, Faulted, LiveSave, Outcome, Saved, describe_fault
from machine.stop import KICK_INTERVAL, StopRequest
from vmstate import x86
from vmstate.errors import UsageError
from vmstate.pages import union
from vmstate.state import PAGE_SIZE, PendingCall, VcpuState, VmState

from . import dirty, unicorn_state
from .cpu import SoftCpu
from .faults import page_fault
from .written import drop_zero_pages, written_pages

APIC_BASE = 0xFEE00900          # what KVM gives a fresh vCPU 0 (enabled, bootstrap processor)
NO_STOP_ADDRESS = (1 << 64) - 1
EFER_NXE = 1 << 11
CR4_OSXSAVE, CPUID1_ECX_OSXSAVE = 1 << 18, 1 << 27
SYSCALL_INSTRUCTION = b"\x0f\x05"


SYSCALL_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


def add_syscall_hook(uc: Uc, callback) -> ctypes._CFuncPtr:
    """Hook `syscall` with `callback(handle, user_data)` through the C API; returns the ctypes
    function, which must be kept alive as long as the hook."""
    function = SYSCALL_HOOK(callback)
    handle = ctypes.c_size_t()
    status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN, function, None,
                               1, 0, ctypes.c_int(X.UC_X86_INS_SYSCALL))
    if status:
        raise UcError(status)
    return function


class SoftStop(StopRequest):
    """StopRequest for unicorn: the kick is uc.emu_stop() (from any thread)."""

    def __init__(self, uc: Uc):
        super().__init__(run_page=SimpleNamespace(immediate_exit=0))    # KVM's, unused here
        self.uc = uc

    def _kick(self) -> None:
        while not self._stopped.wait(KICK_INTERVAL):
            try:
                self.uc.emu_stop()
            except UcError:
                pass


class SoftMachine(Machine):
    saved_by = "soft"

    def __init__(self, memory: GuestMemory):
        """Takes ownership of `memory`."""
        super().__init__(memory)
        try:
            self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
            self.uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.host_address)
            unicorn_state.map_scratch(self.uc)
        except BaseException:
            memory.close()
            raise
        self.template = None                  # the VcpuState for what unicorn does not hold
        self.stop = SoftStop(self.uc)
        self.cpu = SoftCpu(self)
        self._present: bytes | None = None           # pages known present so far
        self._cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self._indexed: set[int] = set()
        self._hook_error: BaseException | None = None
        self._budget: int | None = None           # run's max_instructions
        self._slice: tuple[int, int | None] = (0, None)    # host slice: microseconds, count
        # Held by whatever may write the guest's page tables: the run loop while unicorn runs
        # guest code (it sets D bits; released while a system call is served), mprotect and
        # execve, and a live migration's sender while it takes the dirty bits (_hold_cpu).
        self.tables_lock = threading.Lock()
        self._handed_back = threading.Event()    # clear while the sender holds the CPU
        self._handed_back.set()
        self._kicked = False                  # the sender stopped unicorn to take the CPU
        self._tables_changed = False          # unicorn's TLB must go before guest code runs
        self._written_lock = threading.Lock()    # the present set and the VMM's write marks
        self._unsent: np.ndarray | None = None   # VMM writes since the last take_dirty
        self._sent: np.ndarray | None = None     # pages a live migration's receiver has

    def _close_cpu(self) -> None:
        self.uc = None

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def boot(cls, program_path: str, argv: list[str], memory_size: int, root: str,
             options: GuestOptions = GuestOptions()) -> SoftMachine:
        """A machine about to run `program_path`'s first instruction, in ring 3."""
        program = inspect_program(program_path)
        vm = cls(GuestMemory(memory_size))
        try:
            rsp = load_guest(vm, program, argv, root, options)
            cpuid = unicorn_state.unicorn_cpuid(vm.uc)
            vm._enter_vcpu(boot_vcpu_state(program, rsp, APIC_BASE, cpuid))
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def restore(cls, state: VmState, memory: GuestMemory, root: str) -> SoftMachine:
        """As VirtualMachine.restore: `memory` already holds the guest's memory."""
        vm = cls(memory)
        vm._restore(state, root)
        return vm

    def _enter_vcpu(self, vcpu: VcpuState) -> None:
        self.template = vcpu
        self._osxsave = bool(vcpu.sregs.cr4 & CR4_OSXSAVE)    # ring 3 cannot change CR4
        for entry in vcpu.cpuid:
            self._cpuid[entry.function, entry.index if entry.flags & 1 else 0] = (
                entry.eax, entry.ebx, entry.ecx, entry.edx)
            if entry.flags & 1:
                self._indexed.add(entry.function)
        unicorn_state.enter(self.uc, vcpu)
        self._syscall_hook = add_syscall_hook(self.uc, self._on_syscall_checked)
        if self._cpuid:
            self.uc.hook_add(UC_HOOK_INSN, self._on_cpuid, aux1=X.UC_X86_INS_CPUID)
        self.uc.hook_add(UC_HOOK_INTR, self._on_exception)

    # -- running -------------------------------------------------------------------------------

    def run(self, trace=None, save=None, gate=None, paracalls=None,
            max_instructions: int | None = None) -> Outcome:
        """Machine.run; with `max_instructions`, the guest is saved after exactly that many
        instructions."""
        if max_instructions is not None and isinstance(save, LiveSave):
            raise UsageError("--max-instructions saves at an exact instruction: it cannot end "
                             "in a live migration (leave out --live)")
        self._budget = max_instructions
        return super().run(trace, save, gate, paracalls)

    # A multi-VM host's slices (kvm_backend.host): unicorn ends them itself, after a number of
    # instructions or a time (its `timeout`); end_slice also works from a signal handler.

    def begin_slice(self, seconds: float, instructions: int | None) -> None:
        self._slice = (int(seconds * 1e6), instructions)

    def end_slice(self) -> None:
        try:
            self.uc.emu_stop()
        except UcError:
            pass

    def run_slice(self) -> Outcome | None:
        """Run until the guest ends (its Outcome), or None when a slice ended: the host's
        (time or instructions), or a save was refused. With an instruction budget (run's
        max_instructions), its end saves the guest."""
        timeout_us, slice_instructions = self._slice
        count = self._budget or slice_instructions or 0
        self._stopped_by: Outcome | tuple | None = None
        self._exception: int | None = None
        self._hook_error = None
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        try:
            with self.tables_lock:
                self._kicked = False          # a kick from now on is for this run
                self._flush_if_tables_changed()
                self.uc.emu_start(rip, NO_STOP_ADDRESS, timeout=0 if count else timeout_us,
                                  count=count)
            if self._hook_error is not None:
                raise self._hook_error
        except UcError as e:
            self._yield_cpu()
            self._pass_gate()
            vector = 6 if e.errno == UC_ERR_INSN_INVALID else None
            return self._fault(vector)
        kicked = self._yield_cpu()
        self._pass_gate()
        stopped = self._stopped_by
        if isinstance(stopped, (Exited, Faulted, Saved)):
            return stopped
        if stopped is SLICE_ENDED:
            return None
        if isinstance(stopped, StopHere):
            return self._on_stop(self._running.save, stopped.pending)
        if self._exception is not None:
            return self._fault(self._exception)
        if self.stop.requested.is_set():
            if self._running.save is None:
                return Faulted(f"the VM was stopped: {self.stop.reason}", x86.SIGSEGV)
            outcome = self._stop_requested()
            if outcome is None:
                self._budget = None           # the slice ended early: the count is lost
            return outcome
        if kicked:
            return None                       # the guest goes on where it was stopped
        if self._budget:
            save = self._running.save
            return self._save(save, None) if save is not None else None
        found = self._page_fault_at_rip()     # unicorn may end on a fault without a word
        if found is not None:
            return self._fault(14, found)
        if count or timeout_us:
            return None
        return self._fault(None)

    def _on_syscall_checked(self, _handle, _user_data) -> None:
        """The hook unicorn calls (straight through ctypes: the binding's wrapping costs
        microseconds a call). An error is kept for run() to raise: none may cross C code.
        No guest instruction runs while a call is served: a live migration may take the
        dirty bits meanwhile."""
        self.tables_lock.release()
        try:
            self._on_syscall()
        except BaseException as e:
            if self._hook_error is None:
                self._hook_error = e
            self.uc.emu_stop()
        finally:
            self.tables_lock.acquire()
            self._flush_if_tables_changed()

    def _on_syscall(self) -> None:
        self._pass_gate()
        cpu = self.cpu
        cpu.enter_call()
        try:
            self._serve(cpu)
        finally:
            cpu.leave_call()

    def _serve(self, cpu: SoftCpu) -> None:
        served = self._serve_syscall(*cpu.call_at_entry())
        if served is not None:
            self._stop_with(served)

    def _rewind_to_syscall(self, nr: int, args: tuple[int, ...]) -> PendingCall | None:
        cpu = self.cpu
        if self.memory.read(cpu.read_register("rcx") - 2, 2) != SYSCALL_INSTRUCTION:
            return None
        cpu.write_register("rax", nr)
        return PendingCall(nr, args, cpu.rewind_to_syscall())

    def _stop_with(self, outcome) -> None:
        self._stopped_by = outcome
        self.uc.emu_stop()

    def _on_cpuid(self, uc: Uc, _) -> int:
        """Answer CPUID from the machine's table (the image's), as KVM would."""
        function, index = uc.reg_read_batch([X.UC_X86_REG_RAX, X.UC_X86_REG_RCX])
        function &= 0xFFFFFFFF
        key = (function, index & 0xFFFFFFFF if function in self._indexed else 0)
        values = self._cpuid.get(key, (0, 0, 0, 0))
        if function == 1:                 # OSXSAVE mirrors CR4.OSXSAVE, as on a real CPU
            eax, ebx, ecx, edx = values
            ecx = ecx & ~CPUID1_ECX_OSXSAVE | (CPUID1_ECX_OSXSAVE if self._osxsave else 0)
            values = (eax, ebx, ecx, edx)
        uc.reg_write_batch(list(zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX,
                                     X.UC_X86_REG_RDX), values)))
        return 1

    def _on_exception(self, uc: Uc, vector: int, _) -> None:
        if self._exception is None:
            self._exception = vector
        uc.emu_stop()

    def _page_fault_at_rip(self) -> tuple[int, int] | None:
        """(address, error code) of the page fault the instruction at RIP would take, if any
        (decoded from the instruction and the page tables)."""
        rip, cr3 = self.uc.reg_read_batch([X.UC_X86_REG_RIP, X.UC_X86_REG_CR3])
        return page_fault(self.memory.read_phys, self._read_register, cr3, rip,
                          bool(self.template.sregs.efer & EFER_NXE))

    def _fault(self, vector: int | None, found: tuple[int, int] | None = None
               ) -> Outcome | None:
        """Report as KVM would, or (the guest handles the signal) enter its handler and go
        on (None). Unicorn may report a page fault as vector 8, or stop with no reason:
        both are decoded from the instruction and the page tables, unless the caller already
        did (`found`)."""
        rip, rsp = self.uc.reg_read_batch([X.UC_X86_REG_RIP, X.UC_X86_REG_RSP])
        error_code, address = 0, rip
        if vector in (None, 8, 14):
            if found is None:
                found = self._page_fault_at_rip()
            if found is None and vector is None:
                return Faulted(f"guest stopped at rip {rip:#x} for no reason the software "
                               "CPU gave", x86.SIGSEGV)
            if found is not None:
                vector, (address, error_code) = 14, found
        guard = self.address_space.guard_page if self.address_space else None
        fault = describe_fault(vector, error_code, rip, rsp, True, address, guard)
        if self._deliver_fault(fault, vector, error_code, address):
            return None
        return fault

    def _deliver_fault(self, fault: Faulted, vector: int, error_code: int, address: int
                       ) -> bool:
        """As VirtualMachine._deliver_fault: a guest with a handler for the fault's signal
        enters it, with the faulting address in its siginfo (RIP stays on the instruction)."""
        if not self._handles_fault(fault):
            return False
        self.cpu.enter_fault()
        try:
            return self._enter_handler(fault, vector, error_code, address)
        finally:
            self.cpu.leave_fault()

    def _read_register(self, name: str) -> int:
        return self.uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}"))

    # -- saving --------------------------------------------------------------------------------

    def return_to_user(self, result: int) -> None:
        """Finish the system call under way with `result` (para-calls)."""
        self.cpu.return_to_user(result)

    def capture_vcpu(self) -> VcpuState:
        """vCPU 0's state alone; inside a system call, as the guest will resume."""
        return replace(unicorn_state.capture(self.uc, self.template,
                                             self.cpu.resume_registers()), id=0)

    # -- a guest's fork and execve -------------------------------------------------------------

    def fork(self) -> int:
        """The VMM process forks (guest memory copied on write, host fds shared, unicorn
        and all); the child VMM runs the copy and exits with it, as on KVM."""
        self.present_pages()          # pages shared with the copy are no longer "exclusive"
        sys.stdout.flush()
        sys.stderr.flush()
        with self.tables_lock:                # the copy's lock is free when the copy runs
            pid = os.fork()
        if pid:
            return pid
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        self.stop = SoftStop(self.uc)         # the parent's threads did not come along
        self._running.syscalls.stop_fd = self.stop.cancel_fd
        self.migration = None                 # a live migration stays the parent's
        self._kicked = False
        self._handed_back.set()
        self.forked_child = True
        return 0

    def exec(self, host_path: str, argv: list[str], envp: list[str]) -> UserAddressSpace:
        with self.tables_lock:
            space, regs = load_new_program(self, host_path, argv, envp)
        self.uc.ctl_flush_tb()                # the code unicorn translated is gone
        self.forget_translations()            # and the page tables were rewritten
        return space, regs

    def forget_translations(self) -> None:
        """The VMM changed the guest's page tables: writing CR3 (the same value) makes unicorn
        drop the translations its TLB cached, as on a real CPU."""
        self.uc.reg_write(X.UC_X86_REG_CR3, self.uc.reg_read(X.UC_X86_REG_CR3))

    def present_pages(self) -> bytes:
        """Pages ever written: by the guest or the VMM (found as pages private to this
        process, and the VMM's own writes), or present in the image restored from."""
        with self._written_lock:
            if self._present is None:
                self._present = self._image_bytemap()
            written = written_pages(self.memory.view, self.memory.host_address)
            self._present = union(union(self._present, written), self._take_vmm_writes())
            return self._present

    def _take_vmm_writes(self) -> bytes:
        """The VMM's writes since the last look, kept for take_dirty too while a live
        migration tracks writes (the caller holds _written_lock)."""
        written = self.memory.take_written()
        if self._unsent is not None:
            self._unsent |= np.frombuffer(written, np.uint8)
        return bytes(written)

    # -- a live migration's log of written pages (called from its sender thread) ---------------

    def start_tracking(self) -> np.ndarray:
        """Keep the pages written from now on for take_dirty; the pages present now."""
        self._hold_cpu(lambda: dirty.take_written(self.memory))    # a new round of D bits
        with self._written_lock:
            self._unsent = np.zeros(self.memory.size // PAGE_SIZE, np.uint8)
        present = np.frombuffer(self.present_pages(), np.uint8).copy()
        self._sent = present.copy()
        return present

    def take_dirty(self) -> np.ndarray:
        """Pages written since start_tracking or the previous call (one byte per page). A
        written page-table entry stands for all its pages: of those, a page the receiver
        does not have yet and that is still all zero is left out (it has it as zero)."""
        written = self._hold_cpu(lambda: dirty.take_written(self.memory))
        new = written & ~self._sent
        written &= self._sent
        drop_zero_pages(self.memory.view, new)
        with self._written_lock:
            self._take_vmm_writes()
            taken, self._unsent = self._unsent, np.zeros_like(written)
        taken |= written | new
        self._sent |= taken
        return taken

    def stop_tracking(self) -> None:
        with self._written_lock:
            self._unsent = None
        self._sent = None

    def _hold_cpu(self, action):
        """Run `action` (from another thread) while no guest instruction runs and nothing
        else writes the page tables: unicorn is stopped if it runs, and the run loop waits
        until this is done. Unicorn's TLB is flushed before guest code runs again."""
        self._handed_back.clear()
        try:
            while not self.tables_lock.acquire(timeout=KICK_INTERVAL):
                self._kicked = True
                self.end_slice()
            try:
                self._tables_changed = True
                return action()
            finally:
                self.tables_lock.release()
        finally:
            self._handed_back.set()

    def _yield_cpu(self) -> bool:
        """After unicorn returned: if the sender stopped it to take the CPU, wait until it
        is done (True)."""
        if not self._kicked:
            return False
        self._kicked = False
        self._handed_back.wait()
        return True

    def _flush_if_tables_changed(self) -> None:
        if self._tables_changed:
            self._tables_changed = False
            self.forget_translations()
