"""Booting a fresh machine and a guest's execve, the CPU-independent part: load a static ELF
program into guest memory with the boot structures, set the personality's state, and give the
VMM's boot template (the vCPU at the program's entry point, in ring 3) for either backend to
enter."""

from __future__ import annotations

import os

from vmstate.errors import ProgramError
from vmstate.state import CpuidEntry, Registers, VcpuState

from linux_personality import vdso
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.options import GuestOptions

from . import layout
from .loader import Program, build_stack, heap_start, inspect_program, load_program

MP_STATE_RUNNABLE = 0            # the vCPU runs (KVM_MP_STATE_RUNNABLE)


def load_guest(vm, program: Program, argv: list[str], root: str, options: GuestOptions) -> int:
    """Fill a fresh machine's memory (boot structures, program, stack) and its personality
    state (address space, files, identity); return the initial stack pointer. `vm` is either
    backend's machine: it has `memory` and the personality's attributes."""
    memory = vm.memory
    vm.address_space = UserAddressSpace.fresh(memory, layout.USER_START, heap_start(program),
                                              memory.size)
    for addr, data in layout.boot_structures(memory.size, vm.address_space.guard_page):
        memory.write_phys(addr, data)
    memory.set_user_range(layout.USER_START, vm.address_space.state.user_end)
    load_program(program, memory, vm.address_space.state.mmap_top)
    rsp = build_stack(memory, program, argv, vm.address_space.stack_top)
    vm.files = FileTable.with_stdio(root, options.limits.max_fds)
    try:
        vm.files.namespace.enter(options.cwd)
    except OSError as e:
        raise ProgramError(f"--cwd {options.cwd}: {e.strerror} (inside the guest root "
                           f"{root})") from None
    vm.identity = Identity(hostname=options.hostname)
    vm.limits = options.limits
    vm.program, vm.argv = program.path, tuple(argv)
    vm.name = os.path.basename(program.path)
    return rsp


def boot_vcpu_state(program: Program, rsp: int, apic_base: int,
                    cpuid: tuple[CpuidEntry, ...]) -> VcpuState:
    """The VMM's boot template: the vCPU at the program's entry point, in ring 3."""
    return VcpuState(regs=layout.boot_registers(program.entry, rsp),
                     sregs=layout.boot_sregs(apic_base), msrs=layout.BOOT_MSRS,
                     cpuid=cpuid, mp_state=MP_STATE_RUNNABLE)


def load_new_program(vm, host_path: str, argv: list[str], envp: list[str]
                     ) -> tuple[UserAddressSpace, Registers]:
    """execve's memory side: the new program in a fresh address space of `vm`'s memory;
    returns it and the registers to start it with. OSError(ENOEXEC) if it cannot be loaded
    (the old program is untouched then)."""
    try:
        program = inspect_program(host_path)
    except ProgramError:
        raise OSError(8, "Exec format error") from None     # ENOEXEC: the shell runs scripts
    memory, old = vm.memory, vm.address_space.state
    if program.end > old.mmap_top:
        raise OSError(12, "Cannot allocate memory")
    memory.zero(old.user_start, old.brk - old.user_start)
    memory.zero(old.mmap_low, old.user_end - old.mmap_low)
    space = UserAddressSpace.fresh(memory, layout.USER_START, heap_start(program),
                                   old.user_end)
    for addr, data in layout.page_tables(memory.size, space.guard_page):   # no mprotect left
        memory.write_phys(addr, data)
    memory.write_phys(layout.VDSO_ADDR, vdso.IMAGE)    # also into a VM restored from before it
    load_program(program, memory, space.state.mmap_top)
    rsp = build_stack(memory, program, argv, space.stack_top, envp)
    vm.address_space = space
    vm.program, vm.argv = host_path, tuple(argv)
    return space, layout.boot_registers(program.entry, rsp)
