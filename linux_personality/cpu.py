"""The small interface between the Linux personality and a CPU backend (KVM, unicorn, a test's
fake): registers, guest memory, and the return from a system call to the guest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .address_space import UserAddressSpace

SYSCALL_ARG_REGISTERS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class GuestFault(Exception):
    """A guest-supplied pointer does not lie in guest user memory (the call gets -EFAULT)."""


class GuestMemory(Protocol):
    """Guest user memory as the personality sees it. Every method checks the range against the
    user range and raises GuestFault outside it; an empty range always passes."""
    user_start: int
    user_end: int

    def check(self, addr: int, length: int) -> None: ...
    def read(self, addr: int, length: int) -> bytes: ...
    def write(self, addr: int, data) -> None: ...
    def zero(self, addr: int, length: int) -> None: ...
    def user_view(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy view; after writing through it, call mark_written."""
    def mark_written(self, addr: int, length: int) -> None: ...
    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string of at most `limit` bytes; GuestFault if none ends there."""


class Cpu(Protocol):
    """One guest CPU stopped on a `syscall` instruction.

    Registers are named as in the state model ("rax" .. "r15", "rip", "rflags") plus
    "fs_base" and "gs_base". On entry RCX holds the return address and R11 the user RFLAGS,
    as the `syscall` instruction leaves them (a backend whose CPU does not set them must)."""
    memory: GuestMemory

    def read_register(self, name: str) -> int: ...
    def write_register(self, name: str, value: int) -> None: ...

    def return_to_user(self, result: int) -> None:
        """Finish the call as `sysretq` would: RAX = result, RIP = RCX, RFLAGS from R11, user
        code and stack segments."""

    def read_fpu(self) -> bytes:
        """The x87/SSE/AVX state in the XSAVE layout (what a signal frame's fpstate holds)."""

    def write_fpu(self, data: bytes) -> None: ...

    def fork(self) -> int:
        """Duplicate the guest process (its memory copied on write, its host fds shared) and
        return 0 in the copy, which runs on from the returned call, and the copy's host pid
        in the original. The copy's VMM process exits with the guest's status."""

    def exec(self, host_path: str, argv: list[str], envp: list[str]) -> UserAddressSpace:
        """Replace the program: a fresh address space holding `host_path`'s ELF image and
        stack, the CPU at its entry. OSError(ENOEXEC) if it is no program this CPU runs."""
