"""One virtual machine on the software CPU: unicorn over the VMM's guest memory (the same
mapping KVM would use, zero-copy), the guest in ring 3 under its own page tables, and the run
loop that serves its system calls until it exits, faults, is saved, or has run a given number
of instructions.

It offers what kvm_backend.vm.VirtualMachine offers to the session code (boot/restore, run,
capture, the personality's state, `stop`), so images, saves and migrations are the same.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import sys
from dataclasses import replace
from types import SimpleNamespace
from typing import Callable

from unicorn import (
    UC_ARCH_X86, UC_ERR_INSN_INVALID, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc,
    UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from kvm_backend.boot import boot_vcpu_state, load_guest
from kvm_backend.loader import inspect_program
from kvm_backend.memory import GuestMemory
from kvm_backend.stop import KICK_INTERVAL, StopRequest
from kvm_backend.vm import (
    SEGV_ACCERR, SEGV_MAPERR, Exited, Faulted, LiveSave, Outcome, SaveHandler, Saved,
    _end_child_process, describe_fault, timing_mark)
from linux_personality import (
    CallInterrupted, GuestExit, GuestKilled, Personality, SaveRequested, signals, snapshot)
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.options import GuestOptions
from linux_personality.signals import SignalState
from vmstate import x86
from vmstate.errors import UsageError
from vmstate.pages import bytemap_from_runs, runs_from_bytemap, union
from vmstate.state import (
    PAGE_SIZE, GuestLimits, MemoryRegion, PendingCall, VcpuState, VmmState, VmState)

from . import unicorn_state
from .cpu import SoftCpu
from .faults import page_fault
from .written import written_pages

APIC_BASE = 0xFEE00900          # what KVM gives a fresh vCPU 0 (enabled, bootstrap processor)
NO_STOP_ADDRESS = (1 << 64) - 1
EFER_NXE = 1 << 11
CR4_OSXSAVE, CPUID1_ECX_OSXSAVE = 1 << 18, 1 << 27
SLICE_ENDED = ("slice ended",)          # a blocking call was woken to end a host's slice
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


class SoftMachine:
    def __init__(self, memory: GuestMemory):
        """Takes ownership of `memory`."""
        self.memory = memory
        try:
            self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
            self.uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.host_address)
            unicorn_state.map_scratch(self.uc)
        except BaseException:
            memory.close()
            raise
        self.template = None                  # the VcpuState for what unicorn does not hold
        self.files: FileTable | None = None
        self.address_space: UserAddressSpace | None = None
        self.program, self.argv = "", ()
        self.identity = Identity()
        self.signals = SignalState()
        self.limits = GuestLimits()           # what the user capped the guest at
        self.sleep_left_ns: int | None = None  # a restored pending sleep's time left
        self._personality: Personality | None = None
        self.refused_msrs: list[int] = []
        self.stop = SoftStop(self.uc)
        self.cpu = SoftCpu(self)
        self.name = "vm"                      # tags its para-call output
        self.forked_child = False             # this VMM process runs a guest's fork child
        self.serving: int | None = None       # the system call being served, if any
        self._present: bytes | None = None           # pages known present so far
        self._image_present: tuple = ()
        self._cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self._indexed: set[int] = set()
        self._hook_error: BaseException | None = None
        self._budget: int | None = None           # run's max_instructions
        self._slice: tuple[int, int | None] = (0, None)    # host slice: microseconds, count

    def close(self) -> None:
        if self.files is not None:
            self.files.close_all()
        self.stop.close()
        self.uc = None
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
            vm._start(boot_vcpu_state(program, rsp, APIC_BASE, cpuid))
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def restore(cls, state: VmState, memory: GuestMemory, root: str) -> SoftMachine:
        """As VirtualMachine.restore: `memory` already holds the guest's memory."""
        region = state.memory[0]
        vm = cls(memory)
        try:
            vm._image_present = region.present      # as a byte map only when saving
            aspace = state.vmm.address_space
            vm.address_space = UserAddressSpace(aspace, memory)
            memory.set_user_range(aspace.user_start, aspace.user_end)
            vm.program, vm.argv = state.vmm.program, state.vmm.argv
            vm.name = os.path.basename(vm.program) or "vm"
            vm._start(state.vcpus[0])
            vm.limits = state.vmm.limits or GuestLimits()
            vm.sleep_left_ns = state.vmm.sleep_left_ns
            vm.files, vm.identity, vm.signals = snapshot.restore(
                root, state.vmm.files, state.vmm.os, vm.limits.max_fds)
        except BaseException:
            vm.close()
            raise
        return vm

    def _start(self, vcpu) -> None:
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

    def run(self, trace=None, save: SaveHandler | None = None,
            gate: Callable[[], None] | None = None, paracalls=None,
            max_instructions: int | None = None) -> Outcome:
        """Run until the guest exits, faults, is saved through `save`, or (with
        `max_instructions`) has run exactly that many instructions, then saved. `paracalls`
        serves syscalls 401-403 (default: kvm_backend.paracalls.ParaCalls)."""
        self.start(trace, save, gate, paracalls)
        self._budget = max_instructions
        try:
            while (outcome := self.run_slice()) is None:
                pass
        finally:
            self.stop.stopped()
        if self.forked_child:
            _end_child_process(outcome)
        return outcome

    def start(self, trace=None, save: SaveHandler | None = None,
              gate: Callable[[], None] | None = None, paracalls=None) -> None:
        """Make the machine ready for run_slice (run does this itself)."""
        if isinstance(save, LiveSave):
            raise UsageError("live migration (--live) needs KVM's dirty-page log; the software "
                             "CPU migrates cold (leave out --live)")
        from kvm_backend.paracalls import ParaCalls
        self._personality = Personality(
            self.cpu, self.files, self.address_space, program=self.program, trace=trace,
            stop_fd=self.stop.cancel_fd, save_enabled=save is not None,
            max_file_size=self.limits.max_file_size, max_processes=self.limits.max_processes,
            sleep_left_ns=self.sleep_left_ns, identity=self.identity, signals=self.signals)
        self._gate, self._save_handler = gate, save
        self._paracalls = paracalls or ParaCalls(self)
        timing_mark("first-kvm-run")

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
        save = self._save_handler
        timeout_us, slice_instructions = self._slice
        count = self._budget or slice_instructions or 0
        self._stopped_by: Outcome | tuple | None = None
        self._exception: int | None = None
        self._hook_error = None
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        try:
            self.uc.emu_start(rip, NO_STOP_ADDRESS, timeout=0 if count else timeout_us,
                              count=count)
            if self._hook_error is not None:
                raise self._hook_error
        except UcError as e:
            self._pass_gate()
            vector = 6 if e.errno == UC_ERR_INSN_INVALID else None
            return self._fault(vector)
        self._pass_gate()
        stopped = self._stopped_by
        if isinstance(stopped, (Exited, Faulted, Saved)):
            return stopped
        if stopped is SLICE_ENDED:
            return None
        if isinstance(stopped, tuple):                   # ("save", pending call or None)
            return self._save(save, stopped[1])
        if self._exception is not None:
            return self._fault(self._exception)
        if self.stop.requested.is_set():
            if save is None:
                return Faulted(f"the VM was stopped: {self.stop.reason}", x86.SIGSEGV)
            if self._refuse_save():
                self._budget = None           # the slice ended early: the count is lost
                return None
            return self._save(save, None)
        if self._budget:
            return self._save(save, None) if save is not None else None
        if self._takes_page_fault():          # unicorn may end on a fault without a word
            return self._fault(14)
        if count or timeout_us:
            return None
        return self._fault(None)

    def _pass_gate(self) -> None:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate()
            timing_mark("gate-passed")

    def _on_syscall_checked(self, _handle, _user_data) -> None:
        """The hook unicorn calls (straight through ctypes: the binding's wrapping costs
        microseconds a call). An error is kept for run() to raise: none may cross C code."""
        try:
            self._on_syscall()
        except BaseException as e:
            if self._hook_error is None:
                self._hook_error = e
            self.uc.emu_stop()

    def _on_syscall(self) -> None:
        if self._gate is not None:
            self._pass_gate()
        cpu = self.cpu
        cpu.enter_call()
        try:
            self._serve(cpu)
        finally:
            cpu.leave_call()

    def _serve(self, cpu: SoftCpu) -> None:
        nr, args = cpu.call_at_entry()
        if self._paracalls.serves(nr):
            outcome = self._paracalls.serve(nr, args, self._personality.trace)
            if outcome is not None:
                self._stop_with(outcome)
            return
        self.serving = nr
        try:
            self._personality.serve()
        except GuestExit as e:
            self._stop_with(Exited(e.status))
        except GuestKilled as e:
            name = signal.Signals(e.signal).name if e.signal in signal.valid_signals() \
                else f"signal {e.signal}"
            self._stop_with(Faulted(f"guest killed by {name}", e.signal))
        except SaveRequested:
            if self._refuse_save():
                cpu.return_to_user(-errno.EBUSY)
                return
            cpu.return_to_user(0)             # after the restore, syscall(400) returns 0
            self._stop_with(("save", None))
        except CallInterrupted:
            pending = None
            if self.memory.read(cpu.read_register("rcx") - 2, 2) == SYSCALL_INSTRUCTION:
                cpu.write_register("rax", nr)
                pending = PendingCall(nr, args, cpu.rewind_to_syscall())
            else:
                cpu.return_to_user(-errno.EINTR)
            if not self.stop.requested.is_set():   # a host's slice ended (stop.interrupt_call)
                self._stop_with(SLICE_ENDED)
                return
            if self._refuse_save():
                return                        # the guest re-issues the call
            self._stop_with(("save", pending))
        finally:
            self.serving = None

    def _refuse_save(self) -> bool:
        """A guest with child processes is not saved (a save holds one process), as on KVM."""
        children = self._personality.children
        if not children:
            return False
        pids = ", ".join(str(pid) for pid in sorted(children))
        print(f"vmstate: save refused: the guest has child processes ({pids}); an image holds "
              "one process", file=sys.stderr, flush=True)
        self.stop.reset()
        return True

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

    def _takes_page_fault(self) -> bool:
        """The instruction at RIP would take a page fault."""
        rip, cr3 = self.uc.reg_read_batch([X.UC_X86_REG_RIP, X.UC_X86_REG_CR3])
        return page_fault(self.memory.read_phys, self._read_register, cr3, rip,
                          bool(self.template.sregs.efer & EFER_NXE)) is not None

    def _fault(self, vector: int | None) -> Outcome | None:
        """Report as KVM would, or (the guest handles the signal) enter its handler and go
        on (None). Unicorn may report a page fault as vector 8, or stop with no reason:
        both are decoded from the instruction and the page tables."""
        rip, rsp, cr3 = self.uc.reg_read_batch([X.UC_X86_REG_RIP, X.UC_X86_REG_RSP,
                                                X.UC_X86_REG_CR3])
        error_code, address = 0, rip
        if vector in (None, 8, 14):
            found = page_fault(self.memory.read_phys, self._read_register, cr3, rip,
                               bool(self.template.sregs.efer & EFER_NXE))
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
        if not signals.handles_fault(self._personality, fault.signal):
            return False
        code = (SEGV_ACCERR if error_code & 1 else SEGV_MAPERR) if vector == 14 else 0
        self.cpu.enter_fault()
        try:
            signals.enter_handler(self._personality, fault.signal,
                                  struct.pack("<iiiiQ", fault.signal, 0, code, 0, address))
        except GuestKilled:           # no room for the handler's frame: the fault ends the run
            return False
        finally:
            self.cpu.leave_fault()
        return True

    def _read_register(self, name: str) -> int:
        return self.uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}"))

    # -- saving --------------------------------------------------------------------------------

    def _save(self, save: SaveHandler, pending: PendingCall | None) -> Saved:
        timing_mark("save-start")
        self.stop.stopped()
        where = save(self.capture(pending), [self.memory.view])
        timing_mark("save-done")
        return Saved(where)

    def pause(self) -> None:
        """Between slices (the host's control commands): nothing pending to complete here."""

    def save_now(self, save: SaveHandler) -> Saved:
        """Save the machine between slices through `save`; it ends."""
        return self._save(save, pending=None)

    def return_to_user(self, result: int) -> None:
        """Finish the system call under way with `result` (para-calls)."""
        self.cpu.return_to_user(result)

    def settle(self, result: int) -> None:
        """As VirtualMachine.settle: the call under way returns `result`, and capture() sees
        the guest as it resumes."""
        self.cpu.return_to_user(result)

    def capture_vcpu(self) -> VcpuState:
        """vCPU 0's state alone; inside a system call, as the guest will resume."""
        return unicorn_state.capture(self.uc, self.template, self.cpu.resume_registers())

    def capture(self, pending: PendingCall | None = None) -> VmState:
        files, guest_os = snapshot.capture(self.files, self.identity, self.signals)
        vmm = VmmState(program=self.program, argv=self.argv, files=files,
                       address_space=self.address_space.state, pending=pending, os=guest_os,
                       saved_by="soft", limits=self.limits,
                       sleep_left_ns=None if pending is None or self._personality is None
                       else self._personality.sleep_left_ns)
        region = MemoryRegion(0, self.memory.size, runs_from_bytemap(self.present_pages()))
        return VmState(vcpus=(replace(self.capture_vcpu(), id=0),), memory=(region,), vmm=vmm)

    # -- a guest's fork and execve -------------------------------------------------------------

    def fork(self) -> int:
        """The VMM process forks (guest memory copied on write, host fds shared, unicorn
        and all); the child VMM runs the copy and exits with it, as on KVM."""
        self.present_pages()          # pages shared with the copy are no longer "exclusive"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        self.stop = SoftStop(self.uc)         # the parent's threads did not come along
        self._personality.stop_fd = self.stop.cancel_fd
        self.forked_child = True
        return 0

    def exec(self, host_path: str, argv: list[str], envp: list[str]) -> UserAddressSpace:
        from kvm_backend.guest_process import load_new_program
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
        if self._present is None:
            self._present = bytes(bytemap_from_runs(self._image_present,
                                                    self.memory.size // PAGE_SIZE))
        written = written_pages(self.memory.view, self.memory.host_address)
        self._present = union(union(self._present, written), bytes(self.memory.take_written()))
        return self._present
