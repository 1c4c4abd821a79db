"""What the `vmstate run` and `vmstate restore` commands do with a VM, start to outcome."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Callable

from linux_personality.options import GuestOptions
from vmstate.background import BackgroundCall
from vmstate.errors import KvmNotAvailableError, UsageError
from vmstate.record import record
from vmstate.state import VmState
from vmstate.units import format_size
from vmstate.validate import MIN_MEMORY

from machine.base import Machine, check_restorable
from machine.layout import LARGE_PAGE, MAX_MEMORY
from machine.memory import GuestMemory
from machine.outcome import LiveSave, Outcome, SaveHandler
from machine.timing import timing_mark
from .vm import VirtualMachine, open_kvm

if TYPE_CHECKING:             # imported where used: run does not need the image reader
    from vmstate.image.reader import Image, MemoryCheck

DEFAULT_IMAGE = "vm_image.sav"


@record
class SaveOptions:
    image: str = DEFAULT_IMAGE
    on_signal: bool = False          # save on SIGUSR1
    on_interrupt: bool = False       # save on SIGINT (Ctrl-C)
    migrate_to: str | None = None    # HOST:PORT: stream the VM there instead of writing it
    with_files: bool = False         # carry the guest's open files' contents along
    connect_timeout: float = 30.0
    live: bool = False               # migrations (migrate_to, para-call 403) pre-copy while the guest runs
    max_downtime: float = 0.050      # seconds, for a live migration's final stop

    def handler(self, root: str) -> SaveHandler | LiveSave:
        if self.migrate_to is None:
            return save_to_file(self.image)
        from vmstate.migration.protocol import parse_address
        if self.live:
            from vmstate.migration.live_send import LiveOptions
            from machine.live import live_migrate_to
            return live_migrate_to(parse_address(self.migrate_to), self.connect_timeout,
                                   self.with_files, root, LiveOptions(self.max_downtime))
        from .migrate import migrate_to
        return migrate_to(parse_address(self.migrate_to), self.connect_timeout,
                          self.with_files, root, self.image)

    def paracalls(self, vm: Machine):
        """The para-calls (401-403) of `vm`, migrating with these options."""
        from machine.paracalls import ParaCalls
        live = None
        if self.live:
            from vmstate.migration.live_send import LiveOptions
            live = LiveOptions(self.max_downtime)
        return ParaCalls(vm, self.connect_timeout, self.with_files, live=live)

    @property
    def signals(self) -> list[signal.Signals]:
        return ([signal.SIGUSR1] if self.on_signal else []) + \
               ([signal.SIGINT] if self.on_interrupt else [])


def check_memory_size(size: int) -> int:
    """Round up to whole 2 MiB pages; refuse sizes the guest layout cannot hold."""
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise UsageError(f"--memory must be between {MIN_MEMORY >> 20} MiB and "
                         f"{MAX_MEMORY >> 30} GiB")
    return (size + LARGE_PAGE - 1) // LARGE_PAGE * LARGE_PAGE


def save_to_file(path: str) -> SaveHandler:
    def save(state: VmState, region_views: list[memoryview]) -> str:
        from vmstate.image.writer import write_image      # only a SAVE needs the writer
        plan = write_image(path, state, region_views)
        pages = sum(r.present_pages for r in state.memory)
        return f"saved to {path} ({pages} pages, {format_size(plan.memory_bytes)} of memory stored)"
    return save


CPU_CHOICES = ("auto", "kvm", "soft")


class KvmBackend:
    name = "kvm"

    def __init__(self, kvm):
        self.kvm = kvm

    def boot(self, program: str, argv: list[str], memory_size: int, root: str,
             options: GuestOptions) -> VirtualMachine:
        return VirtualMachine.boot(self.kvm, program, argv, memory_size, root, options)

    def restore(self, state: VmState, memory: GuestMemory, root: str) -> VirtualMachine:
        return VirtualMachine.restore(self.kvm, state, memory, root)

    @staticmethod
    def run_options(vm: VirtualMachine, save: SaveOptions, max_instructions: int | None) -> dict:
        """VirtualMachine.run's backend-specific arguments: the para-calls (401-403)."""
        return {"paracalls": save.paracalls(vm)}


def choose_backend(cpu: str = "auto", max_instructions: int | None = None,
                   counted_by: str = "--max-instructions"):
    """The CPU that runs the guest: KVM, the software CPU (unicorn), or for "auto" KVM if it
    can create a VM and the software CPU otherwise (said once on stderr). Only the software
    CPU counts instructions, so "auto" with `max_instructions` (named `counted_by` in
    messages) takes it."""
    if cpu not in CPU_CHOICES:
        raise UsageError(f"--cpu {cpu}: must be one of {', '.join(CPU_CHOICES)}")
    if max_instructions is not None:
        if max_instructions <= 0:
            raise UsageError(f"{counted_by} {max_instructions}: must be positive")
        if cpu == "kvm":
            raise UsageError(f"{counted_by} needs the software CPU (--cpu soft): KVM runs the "
                             "guest on the real CPU, which cannot stop it after an exact "
                             "number of instructions")
        cpu = "soft"
    if cpu != "soft":
        try:
            return KvmBackend(open_kvm())
        except KvmNotAvailableError as e:
            if cpu == "kvm":
                raise
            print(f"vmstate: {e}; running the guest on the software CPU (unicorn)",
                  file=sys.stderr, flush=True)
    from soft_backend.backend import SoftBackend
    return SoftBackend()


def run_program(program: str, argv: list[str], memory_size: int, root: str,
                save: SaveOptions, trace=None, options: GuestOptions = GuestOptions(),
                cpu: str = "auto", max_instructions: int | None = None) -> Outcome:
    memory_size = check_memory_size(memory_size)
    backend = choose_backend(cpu, max_instructions)
    with backend.boot(program, argv, memory_size, root, options) as vm:
        vm.stop.on_signals(save.signals)
        return vm.run(trace=trace, save=save.handler(root),
                      **backend.run_options(vm, save, max_instructions))


def restore_image(image: Image, memory_check: MemoryCheck, root: str, save: SaveOptions,
                  trace=None, cpu: str = "auto", max_instructions: int | None = None) -> Outcome:
    """Restore the VM of `image` and run it; `memory_check` (Image.start_memory_check) is
    the verification of its memory, started before this VMM's imports and set-up, which it
    overlaps. The VMM acts on no exit of the guest (so the guest affects nothing) until it
    passes. Closes both."""
    try:
        backend = choose_backend(cpu, max_instructions)
        vm, gate = restored_vm(backend, image, root, memory_check)
        with vm:
            if trace is not None:
                for index in vm.refused_msrs:
                    print(f"vmstate: note: this host does not take MSR {index:#x}; skipped",
                          file=trace)
            vm.stop.on_signals(save.signals)
            return vm.run(trace=trace, save=save.handler(root), gate=gate,
                          **backend.run_options(vm, save, max_instructions))
    finally:
        memory_check.close()
        image.close()


def restored_vm(backend, image: Image, root: str, memory_check: MemoryCheck | None = None
                ) -> tuple[Machine, Callable[[], None]]:
    """A VM of `backend` (KvmBackend or SoftBackend) over `image`'s memory (copy-on-write) and
    the gate its run must pass: the memory verification (`memory_check`, or one started
    here, which a failure here ends). `image` must stay open while the VM runs."""
    verification = _MemoryVerification(memory_check or image.start_memory_check())
    try:
        check_restorable(image.state)
        memory = GuestMemory(image.state.memory[0].size, image_fd=image.fd,
                             image_offset=image.region_data[0].data_offset)
        vm = backend.restore(image.state, memory, root)
    except BaseException:
        if memory_check is None:
            verification.memory_check.close()
        raise
    verification.start(vm.stop)
    return vm, verification.wait


class _MemoryVerification:
    """Waits in a thread for the memory check's child processes, so that a failure stops the
    guest at once (not only at its next exit)."""

    def __init__(self, memory_check: MemoryCheck):
        self.memory_check = memory_check
        self._call: BackgroundCall[None] | None = None

    def start(self, stop) -> None:
        def verify() -> None:
            try:
                self.memory_check.result()
            except Exception:
                stop.request("memory verification failed")    # wait() raises the error
                raise
            finally:
                timing_mark("memory-verified")
        self._call = BackgroundCall(verify, "verify-memory")

    def wait(self) -> None:
        self._call.result()


def receive_and_run(address: tuple[str, int], root: str, max_size: int, min_rate: int,
                    once: bool, save: SaveOptions, trace=None, cpu: str = "auto"
                    ) -> Outcome | None:
    """Serve senders one at a time (a VM runs in the main thread); run each VM received.
    Returns the last VM's outcome (None if the last sender was rejected)."""
    from vmstate.migration.receive import serve

    from .migrate import receive_and_run as run_one
    backend = choose_backend(cpu)     # no KVM: say so now, not after taking a VM in
    outcomes: list[Outcome | None] = [None]

    def handle(connection) -> None:
        outcomes.append(None)
        outcome = run_one(connection, backend, root, max_size, save.handler(root), trace)
        outcomes[-1] = outcome
        print(f"vmstate: receive: the VM from {connection.peer} ended: {describe(outcome)}",
              file=sys.stderr, flush=True)
    serve(address[0], address[1], handle, once, min_rate)
    return outcomes[-1]


def describe(outcome: Outcome) -> str:
    from machine.outcome import Exited, Saved
    if isinstance(outcome, Exited):
        return f"exit status {outcome.status}"
    if isinstance(outcome, Saved):
        return outcome.where
    return outcome.report
