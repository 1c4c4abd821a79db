"""Several VMs in one VMM process (`vmstate host`, and `run`/`restore --control`).

Each VM has its own memory, vCPU, root, file table and outcome. They share the main thread,
round-robin: a VM runs until its time slice ends or it stops on something the VMM serves
outside a slice. The slice is ended by SIGALRM from an interval timer armed at the start of
each slice: its handler sets the running vCPU's `immediate_exit` when it lands in VMM code,
and the signal itself interrupts a KVM_RUN under way. (A tick landing in the few bytecodes
between that check and the ioctl is caught by the next tick: such a slice lasts two.)

Between slices the VMM serves control commands (control.py). A guest blocked in a read
(read, readv on a pipe, FIFO or terminal) is woken at its slice's end through its StopRequest's
pipe; the call is rewound and re-issued when the VM runs again, so it holds no one up. Other
blocking calls (a sleep, poll or select with a timeout, which would restart their time) hold
the thread until they return: the other VMs wait. A VM that ends (exit, fault, save, migration) ends alone; the host returns when all
have ended, or on `quit`. A VM whose live migration is handing over (its last pages and
state going, its vCPU stopped) is not scheduled until the receiver has answered: the host
runs the others and serves commands meanwhile, and never waits for a receiver.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from linux_personality.options import GuestOptions
from vmstate.errors import EXIT_SIGNAL_BASE, VmstateError, describe_error
from vmstate.image.reader import Image
from vmstate.state import FD_STDERR, FD_STDIN, FD_STDOUT
from vmstate.vmm_config import VmEntry

from .session import SaveOptions, check_memory_size, choose_backend, describe, restored_vm
from .tagged_output import TaggedOutput
from machine.base import Machine
from machine.outcome import Exited, Faulted, Outcome, Saved
from machine.timing import timing_mark

SLICE_SIGNAL = signal.SIGALRM
EXIT_QUIT = 137                 # a VM ended by `quit` is reported as killed (128 + SIGKILL)
EXIT_VMM_FAILED = 125
# Blocking calls a slice end interrupts: the guest re-issues them and loses nothing (a sleep
# or a poll with a timeout would start its time again, so those run to their end).
REISSUED_READS = frozenset({0, 19})            # read, readv


def quiet_thread() -> None:
    """Call first in a helper thread: the slice timer's SIGALRM must reach the main thread
    (a process-directed signal may go to any thread that does not block it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {SLICE_SIGNAL})


@dataclass(frozen=True)
class Stopped:
    """The VM was ended without running to its end: `quit`, or a VMM error."""
    report: str
    status: int


@dataclass
class HostedVm:
    entry: VmEntry
    vm: Machine
    image: Image | None = None                      # a restored VM's image, open while it runs
    verified: Callable[[], None] | None = None      # waits for that image's memory check
    outputs: list[TaggedOutput] = field(default_factory=list)
    stdin_fd: int | None = None
    running: bool = True                            # False: stopped by the control socket
    awaiting: Request | None = None                 # a cold `migrate`: replied at its end
    outcome: Outcome | Stopped | None = None
    slices: int = 0
    run_ns: int = 0

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def release(self) -> None:
        if self.verified is not None:
            try:
                self.verified()          # the check reads the image: let it finish first
            except Exception:
                pass                     # a VM that never ran: its image's fault is moot
        self.vm.close()
        for output in self.outputs:
            output.close()
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
        if self.image is not None:
            self.image.close()

    def status(self) -> int:
        """What this VM's end means as an exit status (the guest's own, 128 + signal for a
        fault, 0 when saved or migrated)."""
        match self.outcome:
            case Exited(status=status):
                return status
            case Faulted(signal=sig):
                return EXIT_SIGNAL_BASE + sig
            case Stopped(status=status):
                return status
        return 0

    def describe(self) -> str:
        if self.outcome is None:
            state = "running" if self.running else "stopped"
            return f"{state}, handing over to a migration receiver" if self.vm.handing_over \
                else state
        if isinstance(self.outcome, Stopped):
            return self.outcome.report
        return describe(self.outcome)

    def state_name(self) -> str:
        match self.outcome:
            case None:
                return "running" if self.running else "stopped"
            case Exited():
                return "exited"
            case Faulted():
                return "faulted"
            case Saved():
                return "saved"
        return "ended"


@dataclass
class Request:
    """A control command for the main thread; `reply` gets the answer (a dict)."""
    command: str
    arguments: dict
    reply: queue.Queue = field(default_factory=lambda: queue.Queue(1))


class CommandError(Exception):
    """A control command that cannot be done; the message goes back to the client."""


@dataclass(frozen=True)
class AwaitHandOver:
    """A command's result: reply once the VM's hand-over (HostedVm.vm.handing_over, a
    live.ColdSend) has ended, with the receiver's message or why it failed."""
    hosted: HostedVm


def error_reply(description: str, kind: str = "GenericError") -> dict:
    """A control-protocol error reply."""
    return {"error": {"class": kind, "desc": description}}


class Host:
    def __init__(self, backend, slice_ms: int, tag_output: bool, log=sys.stderr,
                 slice_instructions: int | None = None):
        """`backend`: session.KvmBackend or the software CPU's (which alone can end a slice
        after `slice_instructions`)."""
        self.backend = backend
        self.slice_s = slice_ms / 1000
        self.slice_instructions = slice_instructions
        self.tag_output = tag_output
        self.log = log
        self.vms: list[HostedVm] = []
        self.requests: queue.Queue[Request] = queue.Queue()
        self.quitting = False
        self._wake = Request("", {})       # queued (never served) when a hand-over ends
        self._current: HostedVm | None = None
        self._main = threading.main_thread().ident

    # -- starting VMs ---------------------------------------------------------------------------

    def add(self, entry: VmEntry, options: GuestOptions = GuestOptions(),
            save: SaveOptions | None = None, trace=None) -> HostedVm:
        """Create the VM `entry` describes (a program booted, or a snapshot restored)."""
        save = save or SaveOptions(entry.image)
        image, gate = None, None
        if entry.snapshot is not None:
            image = Image(entry.snapshot)
            try:
                vm, gate = restored_vm(self.backend, image, entry.root)
            except BaseException:
                image.close()
                raise
        else:
            vm = self.backend.boot(entry.program, list(entry.argv),
                                   check_memory_size(entry.memory), entry.root, options)
        vm.name = entry.name
        vm.on_migration_end = lambda: self.requests.put(self._wake)
        hosted = HostedVm(entry, vm, image, gate)
        if self.tag_output:
            self._tag(hosted)
        vm.start(trace=trace, save=save.handler(entry.root), gate=gate,
                 paracalls=save.paracalls(vm))
        self.vms.append(hosted)
        return hosted

    def _tag(self, hosted: HostedVm) -> None:
        """Give the VM tagged stdout/stderr pipes and /dev/null as stdin (several VMs cannot
        share one terminal's input)."""
        outputs = {FD_STDOUT: TaggedOutput(hosted.name, 1), FD_STDERR: TaggedOutput(hosted.name, 2)}
        hosted.outputs = list(outputs.values())
        hosted.stdin_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        for fd in hosted.vm.files.fds():
            guest_file = hosted.vm.files.get(fd)
            if guest_file.entry.kind in outputs:
                guest_file.host_fd = outputs[guest_file.entry.kind].write_fd
            elif guest_file.entry.kind == FD_STDIN:
                guest_file.host_fd = hosted.stdin_fd

    def close(self) -> None:
        """End the VMs still alive (an error stopped the host) and release them."""
        for hosted in self.vms:
            if not hosted.ended:
                hosted.outcome = Stopped("ended with the VMM", EXIT_QUIT)
                hosted.vm.abandon_migration("the VMM is ending")    # its sender uses the VM
                hosted.release()

    # -- scheduling -----------------------------------------------------------------------------

    def run(self) -> list[HostedVm]:
        """Run every VM to its end (or until `quit`); returns them with their outcomes."""
        previous = signal.signal(SLICE_SIGNAL, self._tick)
        timing_mark("first-kvm-run")
        try:
            turn = 0
            while not self.quitting and not all(h.ended for h in self.vms):
                self._end_hand_overs()
                self._serve_requests(wait=not self._runnable())
                runnable = self._runnable()
                if runnable and not self.quitting:
                    turn %= len(runnable)
                    self._run_slice(runnable[turn])
                    turn += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(SLICE_SIGNAL, previous)
        return self.vms

    def _runnable(self) -> list[HostedVm]:
        return [h for h in self.vms if h.running and not h.ended and not h.vm.handing_over]

    def _end_hand_overs(self) -> None:
        """The VMs whose receiver has answered: ended as migrated, or scheduled again."""
        for hosted in self.vms:
            if not hosted.ended and hosted.vm.hand_over_ended():
                sent = hosted.vm.handing_over
                outcome = hosted.vm.end_hand_over()
                if hosted.awaiting is not None:
                    hosted.awaiting.reply.put(
                        {"return": {"description": sent.message}} if outcome is not None else
                        error_reply(f"migration failed ({sent.error}); the VM goes on"))
                    hosted.awaiting = None
                if outcome is not None:
                    self.end(hosted, outcome)

    def _tick(self, signum, frame) -> None:
        current = self._current
        if current is not None:
            current.vm.end_slice()
            if current.vm.serving in REISSUED_READS and self._others_waiting():
                current.vm.stop.interrupt_call()

    def _others_waiting(self) -> bool:
        """Another VM could run, or a control request waits."""
        return not self.requests.empty() or len(self._runnable()) > 1

    def _run_slice(self, hosted: HostedVm) -> None:
        hosted.vm.begin_slice(self.slice_s, self.slice_instructions)
        hosted.vm.stop.clear_interrupted_call()
        self._current = hosted
        signal.setitimer(signal.ITIMER_REAL, self.slice_s, self.slice_s)
        start = time.perf_counter_ns()
        try:
            outcome = hosted.vm.run_slice()
        except VmstateError as e:      # e.g. a SAVE whose image could not be written
            outcome = Stopped(f"VMM error: {describe_error(e)}", EXIT_VMM_FAILED)
        finally:
            self._current = None
            hosted.run_ns += time.perf_counter_ns() - start
            hosted.slices += 1
        if outcome is not None:
            self.end(hosted, outcome)
        elif not self._runnable():
            signal.setitimer(signal.ITIMER_REAL, 0)

    def end(self, hosted: HostedVm, outcome) -> None:
        """The VM has ended with `outcome`: report it and release it."""
        hosted.outcome = outcome
        hosted.vm.stop.stopped()
        hosted.vm.abandon_migration("the guest ended on this host first")   # if under way
        if hosted.awaiting is not None:
            hosted.awaiting.reply.put(error_reply(f"the VM ended here ({hosted.describe()}) "
                                                   "before its receiver answered"))
            hosted.awaiting = None
        if len(self.vms) > 1:
            print(f"vmstate: [{hosted.name}] {hosted.describe()}", file=self.log, flush=True)
        hosted.release()

    # -- control requests (from control.py's threads) --------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (any thread) and end the running slice so it is served soon."""
        self.requests.put(request)
        signal.pthread_kill(self._main, SLICE_SIGNAL)

    def _serve_requests(self, wait: bool) -> None:
        while True:
            try:
                request = self.requests.get(block=wait, timeout=0.5 if wait else None)
            except queue.Empty:
                return
            wait = False
            if request is self._wake:
                continue
            try:
                result = self._execute(request)
                if isinstance(result, AwaitHandOver):
                    result.hosted.awaiting = request      # replied by _end_hand_overs
                    continue
                reply = {"return": result}
            except CommandError as e:
                reply = error_reply(str(e))
            except VmstateError as e:
                reply = error_reply(describe_error(e))
            request.reply.put(reply)

    def refuse_requests(self) -> None:
        """Answer the requests that came too late (every VM had ended)."""
        while True:
            try:
                request = self.requests.get_nowait()
            except queue.Empty:
                return
            if request is not self._wake:
                request.reply.put(error_reply("every VM has ended"))

    def _execute(self, request: Request):
        from .host_commands import COMMANDS
        handler = COMMANDS.get(request.command)
        if handler is None:
            raise CommandError(f"unknown command {request.command!r} (known: "
                               f"{', '.join(sorted(COMMANDS))})")
        return handler(self, request.arguments)

    def find(self, arguments: dict, *, alive: bool = True) -> HostedVm:
        """The VM named by arguments["vm"] (may be left out when there is one VM)."""
        name = arguments.get("vm")
        if name is None:
            if len(self.vms) != 1:
                raise CommandError("name the VM: \"vm\": NAME")
            hosted = self.vms[0]
        else:
            matches = [h for h in self.vms if h.name == name]
            if not matches:
                raise CommandError(f"no VM named {name!r}")
            hosted = matches[0]
        if alive and hosted.ended:
            raise CommandError(f"VM {hosted.name} has ended ({hosted.describe()})")
        return hosted

    def summary(self) -> str:
        width = max(len(h.name) for h in self.vms)
        lines = [f"vmstate: {len(self.vms)} VMs ended:"]
        lines += [f"  {h.name:<{width}}  status {h.status():<3}  {h.describe()}  ({h.slices} "
                  f"slices, {h.run_ns / 1e9:.3f} s)" for h in self.vms]
        return "\n".join(lines)

    def exit_status(self) -> int:
        return max((h.status() for h in self.vms), default=0)


def run_hosted(entries: list[VmEntry], slice_ms: int, control: str | None = None, *,
               options: GuestOptions = GuestOptions(), save: SaveOptions | None = None,
               trace=None, cpu: str = "auto", slice_instructions: int | None = None) -> Host:
    """Start every VM, serve the control socket if asked, and run them all to their end.
    `save` (with its signals) is for a single VM (run/restore); with several VMs each one
    saves to its own image and output lines are tagged with the VMs' names."""
    from .control import ControlServer
    backend = choose_backend(cpu, slice_instructions, "vm_exec_slice_in_instructions")
    host = Host(backend, slice_ms, tag_output=len(entries) > 1,
                slice_instructions=slice_instructions)
    server = None
    try:
        for entry in entries:
            try:
                host.add(entry, options, save, trace)
            except VmstateError as e:
                if len(entries) == 1:
                    raise
                raise type(e)(f"VM {entry.name} ({entry.where}): {e}") from None
        if save is not None and len(entries) == 1:
            host.vms[0].vm.stop.on_signals(save.signals)
        if control is not None:
            server = ControlServer(control, host)
        host.run()
        host.quitting = True
        host.refuse_requests()
    finally:
        if server is not None:
            server.close()
        host.close()
    return host
