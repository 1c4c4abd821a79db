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

from linux_personality.address_space import UserAddressSpace
from machine.boot import load_new_program
from machine.stop import StopRequest

from . import abi, vcpu_state


def fork_vm(vm) -> int:
    """0 in the child, the child VMM's pid in the parent. The guest's registers must already
    hold the call's return (RAX = 0, RIP after the syscall) in the run page."""
    vm.complete_pending_exit()
    state = vm.capture_vcpu()
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
    vm.attach_vcpu()
    run = vm.vcpu.run_page
    vcpu_state.apply(vm.vcpu, state)
    run.s.regs = vm.vcpu.get_regs()          # the run page mirrors the vCPU until its first exit
    run.s.sregs = vm.vcpu.get_sregs()
    vm.stop = StopRequest(run)
    vm.migration = None                   # a live migration stays the parent's
    vm.forked_child = True


def exec_program(vm, host_path: str, argv: list[str], envp: list[str]) -> UserAddressSpace:
    """Replace the guest's program. OSError(ENOEXEC) if it cannot be loaded (the old program
    is untouched then)."""
    space, regs = load_new_program(vm, host_path, argv, envp)
    run = vm.vcpu.run_page
    vcpu_state.regs_to_kvm(regs, run.s.regs)
    run.s.sregs.fs.base = run.s.sregs.gs.base = 0
    run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS
    vm.enter_user_segments()
    vm.forget_translations()      # the page tables were rewritten (no mprotect is left)
    return space

