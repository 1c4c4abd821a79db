"""Several VMs in one VMM process (`vmstate host`, and `run`/`restore --control`).

Each VM has its own memory, vCPU, root, file table and outcome. They share the main thread,
round-robin: a VM runs until its time slice ends or it stops on something the VMM serves
outside a slice. The slice is ended by SIGALRM from an interval timer armed at the start of
each slice: its handler sets the running vCPU's `immediate_exit` when it lands in VMM code,
and the signal itself interrupts a KVM_RUN under way. (A tick landing in the few bytecodes
between that check and the ioctl is caught by the next tick: such a slice lasts two.)

Between slices the VMM serves control commands (control.py). A guest blocked in a system
call (a read that waits, a sleep) holds the thread until the call returns: the other VMs
wait. A VM that ends (exit, fault, save, migration) ends alone; the host returns when all
have ended, or on `quit`.
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
from vmstate.errors import UsageError, VmstateError, describe_error
from vmstate.image.reader import Image
from vmstate.state import FD_STDERR, FD_STDIN, FD_STDOUT
from vmstate.vmm_config import VmEntry

from .session import (
    SaveOptions, check_memory_size, choose_backend, describe, restored_vm, save_to_file)
from .tagged_output import TaggedOutput
from .vm import Exited, Faulted, Outcome, Saved, VirtualMachine, timing_mark

SLICE_SIGNAL = signal.SIGALRM
EXIT_QUIT = 137                 # a VM ended by `quit` is reported as killed (128 + SIGKILL)
EXIT_VMM_FAILED = 125


@dataclass(frozen=True)
class Stopped:
    """The VM was ended without running to its end: `quit`, or a VMM error."""
    report: str
    status: int


@dataclass
class HostedVm:
    entry: VmEntry
    vm: VirtualMachine
    save: SaveOptions
    image: Image | None = None                      # a restored VM's image, open while it runs
    outputs: list[TaggedOutput] = field(default_factory=list)
    stdin_fd: int | None = None
    running: bool = True                            # False: stopped by the control socket
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
                return 128 + sig
            case Stopped(status=status):
                return status
        return 0

    def describe(self) -> str:
        if self.outcome is None:
            return "running" if self.running else "stopped"
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
        hosted = HostedVm(entry, vm, save, image)
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
                hosted.release()

    # -- scheduling -----------------------------------------------------------------------------

    def run(self) -> list[HostedVm]:
        """Run every VM to its end (or until `quit`); returns them with their outcomes."""
        previous = signal.signal(SLICE_SIGNAL, self._tick)
        timing_mark("first-kvm-run")
        try:
            turn = 0
            while not self.quitting and not all(h.ended for h in self.vms):
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
        return [h for h in self.vms if h.running and not h.ended]

    def _tick(self, signum, frame) -> None:
        current = self._current
        if current is not None:
            current.vm.end_slice()

    def _run_slice(self, hosted: HostedVm) -> None:
        hosted.vm.begin_slice(self.slice_s, self.slice_instructions)
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
            self._end(hosted, outcome)
        elif not self._runnable():
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _end(self, hosted: HostedVm, outcome) -> None:
        hosted.outcome = outcome
        hosted.vm.stop.stopped()
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
            try:
                reply = {"return": self._execute(request)}
            except CommandError as e:
                reply = {"error": {"class": "GenericError", "desc": str(e)}}
            except VmstateError as e:
                reply = {"error": {"class": "GenericError", "desc": describe_error(e)}}
            request.reply.put(reply)

    def _execute(self, request: Request):
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
    finally:
        if server is not None:
            server.close()
        host.close()
    return host


def _argument(arguments: dict, name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value:
        raise CommandError(f"argument {name!r} (a string) is needed")
    return value


def _query_vms(host: Host, arguments: dict) -> list[dict]:
    return [{"name": h.name, "state": h.state_name(), "description": h.describe(),
             "program": h.vm.program, "argv": list(h.vm.argv), "root": h.entry.root,
             "snapshot": h.entry.snapshot, "exit_status": h.status() if h.ended else None,
             "slices": h.slices, "run_seconds": round(h.run_ns / 1e9, 6)} for h in host.vms]


def _stop(host: Host, arguments: dict) -> dict:
    host.find(arguments).running = False
    return {}


def _cont(host: Host, arguments: dict) -> dict:
    host.find(arguments).running = True
    return {}


def _dump_state(host: Host, arguments: dict) -> dict:
    hosted = host.find(arguments)
    hosted.vm.pause()
    from .paracalls import ParaCalls
    return {"text": ParaCalls(hosted.vm).dump_text(settle=False)}


def _snapshot(host: Host, arguments: dict) -> dict:
    hosted, path = host.find(arguments), _argument(arguments, "path")
    _refuse_over_program(hosted, path)
    hosted.vm.pause()
    from vmstate.image.writer import write_image
    write_image(path, hosted.vm.capture(), [hosted.vm.memory.view])
    return {"path": path}


def _save(host: Host, arguments: dict) -> dict:
    hosted = host.find(arguments)
    path = arguments.get("path") or hosted.entry.image
    if not isinstance(path, str):
        raise CommandError("argument 'path' must be a string")
    _refuse_over_program(hosted, path)
    hosted.vm.pause()
    outcome = hosted.vm.save_now(save_to_file(path))
    host._end(hosted, outcome)
    return {"path": path, "description": outcome.where}


def _migrate(host: Host, arguments: dict) -> dict:
    hosted, address = host.find(arguments), _argument(arguments, "address")
    from vmstate.migration.protocol import parse_address
    target = parse_address(address)
    hosted.vm.pause()
    from vmstate.image.writer import plan_image
    from vmstate.migration.send import send_to
    state = hosted.vm.capture()
    message = send_to(target, float(arguments.get("connect_timeout", 5)),
                      plan_image(state, [hosted.vm.memory.view]), state,
                      bool(arguments.get("with_files", False)), hosted.entry.root)
    host._end(hosted, Saved(f"migrated to {address}: {message}"))
    return {"description": message}


def _quit(host: Host, arguments: dict) -> dict:
    host.quitting = True
    for hosted in host.vms:
        if not hosted.ended:
            host._end(hosted, Stopped("ended by quit", EXIT_QUIT))
    return {}


def _refuse_over_program(hosted: HostedVm, path: str) -> None:
    from vmstate.atomic import refuse_clobbering
    inputs = {"the program": hosted.vm.program}
    if hosted.entry.snapshot:
        inputs = {}       # saving over the image a VM was restored from is how it is saved again
    try:
        refuse_clobbering({"path": path}, inputs)
    except UsageError as e:
        raise CommandError(str(e)) from None


COMMANDS: dict[str, Callable[[Host, dict], object]] = {
    "query-vms": _query_vms, "stop": _stop, "cont": _cont, "dump-state": _dump_state,
    "snapshot": _snapshot, "save": _save, "migrate": _migrate, "quit": _quit}
