"""What the `vmstate run` / `restore` commands do with a VM, from start to outcome."""

from __future__ import annotations

from vmstate.errors import VmstateError

from .machine import MAX_MEMORY, LARGE_PAGE
from .vm import Outcome, VirtualMachine, open_kvm

MIN_MEMORY = 8 << 20


def check_memory_size(size: int) -> int:
    """Round up to whole 2 MiB pages; refuse sizes the guest layout cannot hold."""
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise VmstateError(f"--memory must be between {MIN_MEMORY >> 20} MiB and "
                           f"{MAX_MEMORY >> 30} GiB")
    return (size + LARGE_PAGE - 1) // LARGE_PAGE * LARGE_PAGE


def run_program(program: str, argv: list[str], memory_size: int, root: str,
                trace=None) -> Outcome:
    memory_size = check_memory_size(memory_size)
    kvm = open_kvm()
    with VirtualMachine.boot(kvm, program, argv, memory_size, root) as vm:
        return vm.run(trace=trace)
