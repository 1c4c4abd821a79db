"""The personality's Cpu (linux_personality.cpu) over unicorn, inside the `syscall` hook.

The registers a call needs are read in one batch when the hook starts and the ones changed are
written back in one batch when it ends (each single register access through the binding costs
microseconds). Unicorn does what `syscall` does only partly: the hook sets RCX and R11 itself,
and unicorn adds 2 to RIP after the hook returns, even to a RIP the hook wrote — so a RIP is
written 2 below where the guest is to resume.
"""

from __future__ import annotations

from unicorn import Uc
from unicorn import x86_const as X

from vmstate import x86

SYSCALL_LENGTH = 2
SYSRET_RFLAGS_MASK = 0x3C7FD7       # the RFLAGS bits sysretq takes from R11 (RF and VM cleared)
MASK64 = (1 << 64) - 1
REGISTER_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "rflags", "fs_base", "gs_base")}
PREFETCH = ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rip", "rflags")
PREFETCH_IDS = [REGISTER_IDS[name] for name in PREFETCH]


class SoftCpu:
    def __init__(self, uc: Uc, memory):
        self.uc = uc
        self.memory = memory
        self._values: dict[str, int] = {}
        self._dirty: dict[str, int] = {}

    def enter_call(self) -> None:
        """The guest just executed `syscall`: RCX = the next instruction, R11 = RFLAGS."""
        self._values = dict(zip(PREFETCH, self.uc.reg_read_batch(PREFETCH_IDS)))
        self._dirty = {}
        self.write_register("rcx", self._values["rip"] + SYSCALL_LENGTH)
        self.write_register("r11", self._values["rflags"])

    def leave_call(self) -> None:
        """Write back what the call changed (before unicorn moves RIP on by 2)."""
        if "rip" in self._dirty:
            self._dirty["rip"] = (self._dirty["rip"] - SYSCALL_LENGTH) & MASK64
        self.uc.reg_write_batch([(REGISTER_IDS[name], value)
                                 for name, value in self._dirty.items()])
        self._dirty = {}

    def read_register(self, name: str) -> int:
        value = self._values.get(name)
        if value is None:
            value = self._values[name] = self.uc.reg_read(REGISTER_IDS[name])
        return value

    def write_register(self, name: str, value: int) -> None:
        self._values[name] = self._dirty[name] = value & MASK64

    def return_to_user(self, result: int) -> None:
        """As `sysretq`: RAX = result, RIP = RCX, RFLAGS from R11 (the guest never left
        ring 3 here, so CS and SS are unchanged)."""
        self.write_register("rax", result)
        self.write_register("rip", self.read_register("rcx"))
        self.write_register("rflags",
                            (self.read_register("r11") & SYSRET_RFLAGS_MASK) | x86.RFLAGS_FIXED)

    def rewind_to_syscall(self) -> int:
        """Put the guest back on its `syscall` instruction (to re-issue the call when it
        resumes); returns that address."""
        rip = self.read_register("rcx") - SYSCALL_LENGTH
        self.write_register("rip", rip)
        return rip
