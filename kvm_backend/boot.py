"""Booting a fresh VM: load a static ELF program and set the vCPU up at its entry point."""

from __future__ import annotations

from vmstate.errors import ProgramError
from vmstate.state import VcpuState

from . import abi, machine, vcpu_state
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from linux_personality.identity import Identity
from linux_personality.options import GuestOptions

from .kvm import Kvm
from .loader import build_stack, heap_start, inspect_program, load_program
from .memory import GuestMemory
from .vm import VirtualMachine


def boot(kvm: Kvm, program_path: str, argv: list[str], memory_size: int,
         root: str, options: GuestOptions = GuestOptions()) -> VirtualMachine:
    """A VM about to run `program_path`'s first instruction, in ring 3."""
    program = inspect_program(program_path)
    vm = VirtualMachine(kvm, GuestMemory(memory_size))
    try:
        vm.address_space = UserAddressSpace.fresh(vm.memory, machine.USER_START,
                                                  heap_start(program), vm.memory.size)
        for addr, data in machine.boot_structures(memory_size, vm.address_space.guard_page):
            vm.memory.write_phys(addr, data)
        vm.memory.set_user_range(machine.USER_START, vm.address_space.state.user_end)
        load_program(program, vm.memory, vm.address_space.state.mmap_top)
        rsp = build_stack(vm.memory, program, argv, vm.address_space.stack_top)
        vm.files = FileTable.with_stdio(root, options.max_fds)
        try:
            vm.files.namespace.enter(options.cwd)
        except OSError as e:
            raise ProgramError(f"--cwd {options.cwd}: {e.strerror} (inside the guest root "
                               f"{root})") from None
        vm.identity = Identity(hostname=options.hostname)
        vm.max_file_size = options.max_file_size
        vm.program, vm.argv = program_path, tuple(argv)
        apic_base = vm.vcpu.get_sregs().apic_base
        vcpu_state.apply(vm.vcpu, VcpuState(
            regs=machine.boot_registers(program.entry, rsp),
            sregs=machine.boot_sregs(apic_base), msrs=machine.BOOT_MSRS,
            cpuid=vcpu_state.cpuid_from_kvm(kvm.supported_cpuid()),
            mp_state=abi.KVM_MP_STATE_RUNNABLE))
    except BaseException:
        vm.close()
        raise
    return vm
