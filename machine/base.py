"""Machine: what a virtual machine is whichever CPU runs it. It holds guest memory and the
personality's state (files, address space, identity, signals), restores them from a VmState
and captures them into one, and gives the run loop its shape: serve system calls until the
guest exits, faults or is saved, stop on request, hand over to a live migration.

A backend (kvm_backend.vm.VirtualMachine, soft_backend.vm.SoftMachine) adds the CPU: it sets
`cpu` and `stop`, and defines _enter_vcpu, run_slice, end_slice, capture_vcpu, return_to_user,
_rewind_to_syscall, pause, present_pages and _close_cpu, and for a live migration's sender
start_tracking, take_dirty and stop_tracking (machine/live.py).
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable

from vmstate import x86
from vmstate.errors import RestoreError
from vmstate.pages import PageSet
from vmstate.state import (
    PAGE_SIZE, GuestLimits, MemoryRegion, PendingCall, VcpuState, VmmState, VmState)

from linux_personality import (
    CallInterrupted, GuestExit, GuestKilled, Personality, SaveRequested, signals, snapshot)
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.signals import SignalState

from .memory import GuestMemory
from .outcome import (
    SEGV_ACCERR, SEGV_MAPERR, Exited, Faulted, HandOver, LiveMigration, LiveSave, Outcome,
    SaveHandler, Saved)
from .stop import StopRequest
from .timing import timing_mark

SLICE_ENDED = "slice ended"           # a blocking call was woken to end a host's time slice


@dataclass(frozen=True)
class StopHere:
    """A system call ended in a stop request (a SAVE, or a signal during a blocking call):
    the run loop saves or hands over, with `pending` re-issued when the guest resumes."""
    pending: PendingCall | None


@dataclass
class Running:
    """What the run loop of a started machine works with."""
    syscalls: Personality
    save: SaveHandler | LiveSave | None
    gate: Callable[[], None] | None
    paracalls: object              # paracalls.ParaCalls (imported late: it imports this module)


class Machine:
    saved_by = ""                     # the image's vmm-saved-by: which CPU saved it
    cpu: object                       # the personality's Cpu
    stop: StopRequest

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.files: FileTable | None = None
        self.address_space: UserAddressSpace | None = None
        self.program, self.argv = "", ()
        self.identity = Identity()
        self.signals = SignalState()
        self.limits = GuestLimits()           # what the user capped the guest at
        self.sleep_left_ns: int | None = None  # a restored pending sleep's time left
        self.refused_msrs: list[int] = []     # MSRs this host would not take on restore
        self.forked_child = False             # this VMM process runs a guest's fork child
        self.name = "vm"                      # tags its para-call output and its lines on a host
        self.serving: int | None = None       # the system call being served, if any
        self.migration: LiveMigration | None = None     # sending while the guest runs
        self.handing_over: HandOver | None = None       # stopped while a sender sends it
        self.on_migration_end: Callable[[], None] = _nothing   # from the sender's thread
        self._running: Running | None = None
        self._image_present: PageSet | None = None    # the restored image's pages, where
                                                       # present_pages starts

    def close(self) -> None:
        if self.files is not None:
            self.files.close_all()
        self.stop.close()
        self._close_cpu()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring -----------------------------------------------------------------------------

    def _restore(self, state: VmState, root: str) -> None:
        """Take `state` (memory already holds the guest's pages); closes the machine if this
        fails. The caller has checked `state` with check_restorable."""
        try:
            self._image_present = state.memory[0].present   # a byte map only when pages are looked at
            aspace = state.vmm.address_space
            self.address_space = UserAddressSpace(aspace, self.memory)
            self.memory.set_user_range(aspace.user_start, aspace.user_end)
            self.program, self.argv = state.vmm.program, state.vmm.argv
            self.name = os.path.basename(self.program) or "vm"
            self._enter_vcpu(state.vcpus[0])
            self.limits = state.vmm.limits or GuestLimits()
            self.sleep_left_ns = state.vmm.sleep_left_ns
            self.files, self.identity, self.signals = snapshot.restore(
                root, state.vmm.files, state.vmm.os, self.limits.max_fds)
        except BaseException:
            self.close()
            raise

    # -- running -------------------------------------------------------------------------------

    def run(self, trace=None, save: SaveHandler | LiveSave | None = None,
            gate: Callable[[], None] | None = None, paracalls=None) -> Outcome:
        """Run until the guest exits, faults, or is saved through `save`. `gate` is called
        before the VMM acts on the guest's first exit (restore verifies memory there).
        `paracalls` serves syscalls 401-403 (default: a ParaCalls with default options)."""
        self.start(trace, save, gate, paracalls)
        try:
            while (outcome := self.run_slice()) is None:
                if self.handing_over is not None:
                    outcome = self.end_hand_over()      # waits for the receiver's answer
                    if outcome is not None:
                        break
        finally:
            self.stop.stopped()
            self.abandon_migration("the guest ended on this host first")
            self._running.syscalls.close()
        if self.forked_child:
            end_child_process(outcome)
        return outcome

    def start(self, trace=None, save: SaveHandler | LiveSave | None = None,
              gate: Callable[[], None] | None = None, paracalls=None) -> None:
        """Make the machine ready for run_slice (run does this itself)."""
        from .paracalls import ParaCalls
        syscalls = Personality(self.cpu, self.files, self.address_space, program=self.program,
                               trace=trace, stop_fd=self.stop.cancel_fd,
                               save_enabled=save is not None,
                               max_file_size=self.limits.max_file_size,
                               max_processes=self.limits.max_processes,
                               sleep_left_ns=self.sleep_left_ns, identity=self.identity,
                               signals=self.signals,
                               reserved_signals=self.stop.watched)
        self._running = Running(syscalls, save, gate, paracalls or ParaCalls(self))
        timing_mark("first-kvm-run")

    def _pass_gate(self) -> None:
        running = self._running
        if running.gate is not None:
            gate, running.gate = running.gate, None
            gate()
            timing_mark("gate-passed")

    def _serve_syscall(self, nr: int, args: tuple[int, ...]) -> Outcome | StopHere | str | None:
        """Serve the system call the guest stopped on: an Outcome if the guest ended, StopHere
        if it is to be saved now, SLICE_ENDED if a host's slice ended during it, else None."""
        running = self._running
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
            if self._refuse_save():
                self.return_to_user(-errno.EBUSY)
                return None
            self.return_to_user(0)             # after the restore, syscall(400) returns 0
            if isinstance(running.save, LiveSave):
                self._begin_live(running.save)
                return None
            return StopHere(None)
        except CallInterrupted:
            pending = self._rewind_to_syscall(nr, args)
            if pending is None:           # not a syscall instruction the guest can re-issue:
                self.return_to_user(-errno.EINTR)      # the call fails as interrupted
            if not self.stop.requested.is_set():       # a time slice ended (stop.interrupt_call)
                return SLICE_ENDED
            if self._refuse_save():
                return None                   # the guest re-issues the call
            return StopHere(pending)
        finally:
            self.serving = None
        return None

    def _rewind_to_syscall(self, nr: int, args: tuple[int, ...]) -> PendingCall | None:
        """Put the guest back on its `syscall` instruction with RAX = nr, so that it re-issues
        the call when it resumes (a blocked read loses no data); None if the bytes before
        the return address are no `syscall`."""
        raise NotImplementedError

    def _enter_handler(self, fault: Faulted, vector: int, error_code: int, address: int
                       ) -> bool:
        """Enter the guest's handler for the fault's signal (registers already as the guest
        faulted, in user mode), with the faulting address in its siginfo; False if there is
        no room for its frame (the fault then ends the run)."""
        code = (SEGV_ACCERR if error_code & 1 else SEGV_MAPERR) if vector == 14 else 0
        try:
            signals.enter_handler(self._running.syscalls, fault.signal,
                                  struct.pack("<iiiiQ", fault.signal, 0, code, 0, address))
        except GuestKilled:
            return False
        return True

    def _handles_fault(self, fault: Faulted) -> bool:
        return signals.handles_fault(self._running.syscalls, fault.signal)

    # -- saving --------------------------------------------------------------------------------

    def _refuse_save(self) -> bool:
        """A guest with child processes is not saved (a save holds one process): say so, and
        let it run on."""
        children = self._running.syscalls.children
        if not children:
            return False
        pids = ", ".join(str(pid) for pid in sorted(children))
        print(f"vmstate: save refused: the guest has child processes ({pids}); an image holds "
              "one process", file=sys.stderr, flush=True)
        self.stop.reset()
        return True

    def _stop_requested(self) -> Outcome | None:
        """A stop request (a signal, a failed verification, a live migration's last round)
        ended a slice: save or hand over; None: the guest carries on."""
        if self._refuse_save():
            return None
        return self._on_stop(self._running.save, pending=None)

    def _on_stop(self, save, pending: PendingCall | None) -> Outcome | None:
        """A stop request reached the run loop (a signal, or a live migration's last round,
        whatever started it); None: the guest carries on (a rewound call is re-issued)."""
        if self.handing_over is not None:
            return None                   # stopped until the receiver answers: end_hand_over
        if self.migration is not None and self.migration.wants_pause.is_set():
            self.stop.reset()             # before the hand-over: a request from now on is kept
            return self._final_copy(pending)
        if not isinstance(save, LiveSave):
            return self._save(save, pending)
        self.stop.reset()
        self._begin_live(save)
        return None

    def _save(self, save: SaveHandler, pending: PendingCall | None) -> Saved:
        timing_mark("save-start")
        self.stop.stopped()
        self.pause()
        where = save(self.capture(pending), [self.memory.view])
        timing_mark("save-done")
        return Saved(where)

    def save_now(self, save: SaveHandler) -> Saved:
        """Save the machine between slices through `save`; it ends."""
        return self._save(save, pending=None)

    def settle(self, result: int) -> None:
        """Finish the system call the vCPU stopped on with `result` and leave it so that
        capture() sees the guest as it resumes; the VM goes on at the next run_slice
        (return_to_user may still change the result it sees)."""
        self.return_to_user(result)
        self.pause()

    def capture(self, pending: PendingCall | None = None) -> VmState:
        """The whole VM state (between slices, or as the guest will resume)."""
        vcpu = self.capture_vcpu()
        files, guest_os = snapshot.capture(self.files, self.identity, self.signals)
        vmm = VmmState(program=self.program, argv=self.argv, files=files,
                       address_space=self.address_space.state, pending=pending, os=guest_os,
                       saved_by=self.saved_by, limits=self.limits,
                       sleep_left_ns=None if pending is None or self._running is None
                       else self._running.syscalls.sleep_left_ns)
        region = MemoryRegion(0, self.memory.size, PageSet.from_bytemap(self.present_pages()))
        return VmState(vcpus=(vcpu,), memory=(region,), vmm=vmm)

    # -- live migration ------------------------------------------------------------------------

    def begin_live_migration(self, save: LiveSave) -> None:
        """Start a live migration now, whatever the VM's own save does (the control socket's
        `migrate live=true`, para-call 403 under --live): the guest runs on; the run loop
        ends the VM with Saved once the receiver has it, or goes on if the migration fails."""
        self._begin_live(save)

    def abandon_migration(self, why: str) -> None:
        for migration in (self.migration, self.handing_over):
            if migration is not None:
                migration.abandon(why)
        self.migration = self.handing_over = None

    def _begin_live(self, save: LiveSave) -> None:
        if self.handing_over is not None or (self.migration is not None
                                             and not self.migration.finished.is_set()):
            return                        # one at a time: this request joins it
        self.migration = save.begin(self)

    def _final_copy(self, pending: PendingCall | None) -> None:
        """Stop the guest for the live migration's last pages and state and give them to the
        sender; the slice ends. The guest stays stopped (`handing_over`) until the run loop
        calls end_hand_over: the run loop never waits for the receiver here, so a host goes
        on with its other VMs and its control socket."""
        timing_mark("save-start")
        stopped_at = time.monotonic()
        self.stop.stopped()
        self.pause()
        self.handing_over, self.migration = self.migration, None
        self.handing_over.hand_over(self.capture(pending), stopped_at)
        self.end_slice()                  # KVM: the next KVM_RUN returns at once

    def send_away(self, hand_over: HandOver) -> None:
        """Between slices (paused): the VM stays stopped while `hand_over` sends it (a host's
        cold `migrate`), until end_hand_over."""
        self.handing_over = hand_over

    def hand_over_ended(self) -> bool:
        """The receiver has answered the hand-over under way (or the connection failed)."""
        return self.handing_over is not None and self.handing_over.finished.is_set()

    def end_hand_over(self) -> Outcome | None:
        """Wait for the hand-over under way to end: Saved if the receiver has the VM, else
        None (the migration failed and the guest carries on here as if nothing happened)."""
        where = self.handing_over.result()
        self.handing_over = None          # only now: an interrupted wait leaves it abandonable
        asked = self.stop.reason if self.stop.requested.is_set() else None
        self.stop.reset()
        if where is None:
            if asked is not None:         # a save signal that came during the hand-over
                self.stop.request(asked)
            timing_mark("resumed-here")
            return None
        timing_mark("save-done")
        return Saved(where)

    # -- the backend's part --------------------------------------------------------------------

    def _enter_vcpu(self, vcpu: VcpuState) -> None:
        raise NotImplementedError

    def _close_cpu(self) -> None:
        raise NotImplementedError

    def run_slice(self) -> Outcome | None:
        raise NotImplementedError

    def end_slice(self) -> None:
        """End the slice under way (any thread, or a signal handler): the run loop returns."""
        raise NotImplementedError

    def pause(self) -> None:
        """Between slices (or before a capture): leave the CPU so that capture() or a save
        sees the guest as it will resume."""

    def return_to_user(self, result: int) -> None:
        """Finish the system call under way with `result`, as `sysretq` would."""
        raise NotImplementedError

    def capture_vcpu(self) -> VcpuState:
        raise NotImplementedError

    def _image_bytemap(self) -> bytes:
        """One byte per page of guest memory, 1 where the restored image had a page."""
        if self._image_present is None:
            return bytes(self.memory.size // PAGE_SIZE)
        return self._image_present.bytemap()

    def present_pages(self):
        """Pages ever written (one byte per page, non-zero if present)."""
        raise NotImplementedError


def _nothing() -> None:
    pass


def check_restorable(state: VmState) -> None:
    """What join also checks before it writes (vmstate.validate.restore_problems)."""
    from vmstate.validate import restore_problems      # only restores need the checks
    for problem in restore_problems(state):
        raise RestoreError(problem.message)


def end_child_process(outcome: Outcome) -> None:
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
