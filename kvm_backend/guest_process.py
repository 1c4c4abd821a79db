"""A guest's fork and execve on KVM.

fork: the VMM process forks. The child VMM keeps the parent's guest memory (the host's fork
copies it on write) and every host fd (so guest descriptors are shared as on Linux), and
makes a VM of its own over that memory with a vCPU set up the way restore does, from the
parent's vCPU state as the call returns. A KVM VM belongs to the process that made it, so
the child closes its copies of the parent's. The child VMM exits when its guest does, with
the guest's status (or dies by the guest's fatal signal), which is what wait4 reports.

execve: the guest's used memory is zeroed, the new program loaded with a fresh stack and
address space, and the vCPU set to its entry point.
"""

from __future__ import annotations

import os
import signal
import sys

from linux_personality import vdso
from linux_personality.address_space import UserAddressSpace
from vmstate.errors import ProgramError

from . import abi, machine, vcpu_state
from .protection import flush_tlb
from .loader import build_stack, heap_start, inspect_program, load_program
from .stop import StopRequest


def fork_vm(vm) -> int:
    """0 in the child, the child VMM's pid in the parent. The guest's registers must already
    hold the call's return (RAX = 0, RIP after the syscall) in the run page."""
    vm.complete_pending_exit()
    state = vcpu_state.capture(vm.kvm, vm.vcpu, 0, vm.msr_list())
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    _become_child(vm, state)
    return 0


def _become_child(vm, state) -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    vm.stop.close()
    vm.vcpu.close()
    vm.vm.close()
    vm.vm = vm.kvm.create_vm()
    vm.vm.set_user_memory_region(0, 0, vm.memory.size, vm.memory.host_address,
                                 abi.KVM_MEM_LOG_DIRTY_PAGES)
    vm.vcpu = vm.vm.create_vcpu(0)
    run = vm.vcpu.run_page
    run.kvm_valid_regs = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
    vcpu_state.apply(vm.vcpu, state)
    run.s.regs = vm.vcpu.get_regs()          # the run page mirrors the vCPU until its first exit
    run.s.sregs = vm.vcpu.get_sregs()
    vm.stop = StopRequest(run)
    vm.forked_child = True


def exec_program(vm, host_path: str, argv: list[str], envp: list[str]) -> UserAddressSpace:
    """Replace the guest's program. OSError(ENOEXEC) if it cannot be loaded (the old program
    is untouched then)."""
    space, regs = load_new_program(vm, host_path, argv, envp)
    run = vm.vcpu.run_page
    vcpu_state.regs_to_kvm(regs, run.s.regs)
    run.s.sregs.fs.base = run.s.sregs.gs.base = 0
    cs, ss = machine.user_return_segments(vm.star)
    vcpu_state.segment_to_kvm(cs, run.s.sregs.cs)
    vcpu_state.segment_to_kvm(ss, run.s.sregs.ss)
    run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
    flush_tlb(vm)                 # the page tables were rewritten (no mprotect is left)
    return space


def load_new_program(vm, host_path: str, argv: list[str], envp: list[str]):
    """The CPU-independent part of execve (shared with the software CPU): the new program in
    a fresh address space of `vm`'s memory; returns it and the registers to start it with."""
    try:
        program = inspect_program(host_path)
    except ProgramError:
        raise OSError(8, "Exec format error") from None     # ENOEXEC: the shell runs scripts
    memory, old = vm.memory, vm.address_space.state
    if program.end > old.mmap_top:
        raise OSError(12, "Cannot allocate memory")
    memory.zero(old.user_start, old.brk - old.user_start)
    memory.zero(old.mmap_low, old.user_end - old.mmap_low)
    space = UserAddressSpace.fresh(memory, machine.USER_START, heap_start(program),
                                   old.user_end)
    for addr, data in machine.page_tables(memory.size, space.guard_page):   # no mprotect left
        memory.write_phys(addr, data)
    memory.write_phys(machine.VDSO_ADDR, vdso.IMAGE)    # also into a VM restored from before it
    load_program(program, memory, space.state.mmap_top)
    rsp = build_stack(memory, program, argv, space.stack_top, envp)
    vm.address_space = space
    vm.program, vm.argv = host_path, tuple(argv)
    return space, machine.boot_registers(program.entry, rsp)
