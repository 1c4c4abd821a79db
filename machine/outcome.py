"""How a run ends (Exited, Faulted, Saved) and what a save or a live migration is, the same
for both CPUs."""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from vmstate import x86
from vmstate.record import record
from vmstate.state import PAGE_SIZE, VmState

SEGV_MAPERR, SEGV_ACCERR = 1, 2          # si_code of a SIGSEGV: no mapping, no permission


@record
class Exited:
    status: int


@record
class Faulted:
    """The guest took an exception (or the CPU could not run it); `signal` is what Linux
    would have sent a process, so the command can exit with 128 + signal."""
    report: str
    signal: int


@record
class Saved:
    """The VM was stopped and its state handed to the save handler, which said where it went
    ("saved to vm_image.sav (...)", "migrated to host:4040: ...")."""
    where: str


Outcome = Exited | Faulted | Saved
SaveHandler = Callable[[VmState, list[memoryview]], str]


class HandOver(Protocol):
    """A VM stopped while a sender thread sends it away (machine/live.py), as the run loop
    sees it: it ends the VM once `finished`, or resumes it if result() is None."""
    finished: threading.Event        # the sender has ended (the receiver answered, or not)

    def result(self) -> str | None:
        """Wait for the end: where the VM went, or None if it did not get there."""
    def abandon(self, why: str) -> None:
        """The guest ended here first: cancel the migration."""


class LiveMigration(HandOver, Protocol):
    """A live migration under way: its pre-copy runs beside the guest, then it hands over."""
    wants_pause: threading.Event     # the sender is ready for the final stop-and-copy

    def hand_over(self, state: VmState, stopped_at: float) -> None:
        """The vCPU stopped at `stopped_at` (time.monotonic()): send the rest (without
        waiting; `finished` is set once the receiver has answered)."""


@record
class LiveSave:
    """Save by live migration: `begin(vm)` starts sending while the guest runs on."""
    begin: Callable[[object], LiveMigration]


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
