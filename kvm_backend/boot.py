"""Booting a fresh VM: load a static ELF program and set the vCPU up at its entry point.

load_guest and boot_vcpu_state do the CPU-independent part (guest memory, the personality's
state, the VMM's boot template), shared with the software CPU (soft_backend)."""

from __future__ import annotations

import os

from vmstate.errors import ProgramError
from vmstate.state import CpuidEntry, VcpuState

from . import abi, machine, vcpu_state
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.options import GuestOptions

from .kvm import Kvm
from .loader import Program, build_stack, heap_start, inspect_program, load_program
from .memory import GuestMemory
from .vm import VirtualMachine


def boot(kvm: Kvm, program_path: str, argv: list[str], memory_size: int,
         root: str, options: GuestOptions = GuestOptions()) -> VirtualMachine:
    """A VM about to run `program_path`'s first instruction, in ring 3."""
    program = inspect_program(program_path)
    vm = VirtualMachine(kvm, GuestMemory(memory_size))
    try:
        rsp = load_guest(vm, program, argv, root, options)
        apic_base = vm.vcpu.get_sregs().apic_base
        vcpu_state.apply(vm.vcpu, boot_vcpu_state(
            program, rsp, apic_base, vcpu_state.cpuid_from_kvm(kvm.supported_cpuid())))
    except BaseException:
        vm.close()
        raise
    return vm


def load_guest(vm, program: Program, argv: list[str], root: str, options: GuestOptions) -> int:
    """Fill a fresh machine's memory (boot structures, program, stack) and its personality
    state (address space, files, identity); return the initial stack pointer. `vm` is either
    backend's machine: it has `memory` and the personality's attributes."""
    memory = vm.memory
    vm.address_space = UserAddressSpace.fresh(memory, machine.USER_START, heap_start(program),
                                              memory.size)
    for addr, data in machine.boot_structures(memory.size, vm.address_space.guard_page):
        memory.write_phys(addr, data)
    memory.set_user_range(machine.USER_START, vm.address_space.state.user_end)
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
    return VcpuState(regs=machine.boot_registers(program.entry, rsp),
                     sregs=machine.boot_sregs(apic_base), msrs=machine.BOOT_MSRS,
                     cpuid=cpuid, mp_state=abi.KVM_MP_STATE_RUNNABLE)
