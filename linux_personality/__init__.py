"""A Linux personality: the system calls of a static x86-64 Linux program, served for a guest
whatever runs its instructions.

It knows nothing of KVM. A CPU backend (kvm_backend; a software CPU next) implements the small
interface in cpu.py and, each time its guest executes `syscall`, calls Personality.serve():

    Cpu.memory                     guest user memory: checked reads, writes, zero-copy views
    Cpu.read_register(name)        "rax".."r15", "rip", "rflags", "fs_base", "gs_base"
    Cpu.write_register(name, v)
    Cpu.return_to_user(result)     finish the call as `sysretq` would (RAX, RIP = RCX, RFLAGS)
    Cpu.read_fpu(), write_fpu()    the FPU state as an XSAVE area (for signal frames)
    Cpu.fork()                     duplicate the guest process (0 in the copy, its pid here)
    Cpu.exec(path, argv, envp)     load a new program into a fresh address space

serve() reads the number and arguments, runs the handler and returns to the guest, or raises
one of stops.GuestExit / SaveRequested / CallInterrupted for the backend's run loop. Handlers
live in one module per subsystem (files, descriptors, directories, memory, processes,
signals, clock, identity) and register themselves
in table.SYSCALLS; the state they share (file table, address space) is in kernel.Personality.
"""

from . import (  # noqa: F401  (they register their calls)
    clock, descriptors, directories, files, identity, memory, processes, signals)
from .kernel import Personality
from .stops import CallInterrupted, GuestExit, GuestKilled, SaveRequested

__all__ = ["Personality", "GuestExit", "GuestKilled", "SaveRequested", "CallInterrupted"]
