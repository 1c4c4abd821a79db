"""What the `vmstate run` and `vmstate restore` commands do with a VM, start to outcome."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from vmstate.errors import VmstateError
from vmstate.image.reader import Image
from vmstate.image.writer import write_image
from vmstate.state import VmState
from vmstate.units import format_size

from .machine import LARGE_PAGE, MAX_MEMORY
from .vm import Outcome, SaveHandler, VirtualMachine, open_kvm, timing_mark

MIN_MEMORY = 8 << 20
DEFAULT_IMAGE = "vm_image.sav"


@dataclass(frozen=True)
class SaveOptions:
    image: str = DEFAULT_IMAGE
    on_signal: bool = False          # save on SIGUSR1
    on_interrupt: bool = False       # save on SIGINT (Ctrl-C)

    @property
    def signals(self) -> list[signal.Signals]:
        return ([signal.SIGUSR1] if self.on_signal else []) + \
               ([signal.SIGINT] if self.on_interrupt else [])


def check_memory_size(size: int) -> int:
    """Round up to whole 2 MiB pages; refuse sizes the guest layout cannot hold."""
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise VmstateError(f"--memory must be between {MIN_MEMORY >> 20} MiB and "
                           f"{MAX_MEMORY >> 30} GiB")
    return (size + LARGE_PAGE - 1) // LARGE_PAGE * LARGE_PAGE


def save_to_file(path: str) -> SaveHandler:
    def save(state: VmState, region_views: list[memoryview]) -> str:
        plan = write_image(path, state, region_views)
        pages = sum(r.present_pages for r in state.memory)
        return f"{path} ({pages} pages, {format_size(plan.memory_bytes)} of memory stored)"
    return save


def run_program(program: str, argv: list[str], memory_size: int, root: str,
                save: SaveOptions, trace=None) -> Outcome:
    memory_size = check_memory_size(memory_size)
    from .boot import boot          # the ELF loader is not needed to restore
    kvm = open_kvm()
    with boot(kvm, program, argv, memory_size, root) as vm:
        vm.stop.on_signals(save.signals)
        return vm.run(trace=trace, save=save_to_file(save.image))


def restore_image(image_path: str, root: str, save: SaveOptions, trace=None) -> Outcome:
    """Restore and run. Memory checksums are verified in a background thread while the vCPU
    starts; the VMM acts on no exit (so the guest affects nothing) until they pass."""
    image = Image(image_path)
    try:
        kvm = open_kvm()
        verification = _MemoryVerification(image)
        with VirtualMachine.restore(kvm, image, root) as vm:
            verification.start(vm.stop)
            if trace is not None:
                for index in vm.refused_msrs:
                    print(f"vmstate: note: this host does not take MSR {index:#x}; skipped",
                          file=trace)
            vm.stop.on_signals(save.signals)
            return vm.run(trace=trace, save=save_to_file(save.image), gate=verification.wait)
    finally:
        image.close()


class _MemoryVerification:
    def __init__(self, image: Image):
        self.image = image
        self.error: Exception | None = None
        self._thread: threading.Thread | None = None

    def start(self, stop) -> None:
        def verify() -> None:
            try:
                self.image.verify_memory()
            except Exception as e:      # reported by wait(), in the main thread
                self.error = e
                stop.request("memory verification failed")
            timing_mark("memory-verified")
        self._thread = threading.Thread(target=verify, daemon=True, name="verify-memory")
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
