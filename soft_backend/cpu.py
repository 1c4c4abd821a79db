"""The personality's Cpu (linux_personality.cpu) over unicorn, inside the `syscall` hook.

The registers a call needs are read in one batch when the hook starts and the ones changed are
written back in one batch when it ends (each single register access through the binding costs
microseconds). Unicorn does what `syscall` does only partly: the hook sets RCX and R11 itself,
and unicorn adds 2 to RIP after the hook returns, even to a RIP the hook wrote — so a RIP is
written 2 below where the guest is to resume.
"""

from __future__ import annotations

import ctypes

from unicorn import Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from vmstate import x86

SYSCALL_LENGTH = 2
SYSRET_RFLAGS_MASK = 0x3C7FD7       # the RFLAGS bits sysretq takes from R11 (RF and VM cleared)
MASK64 = (1 << 64) - 1
REGISTER_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "rflags", "fs_base", "gs_base")}
PREFETCH = ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rip", "rflags")
WRITTEN_BACK = ("rax", "rcx", "r11", "rflags")     # what every call changes


class RegisterBatch:
    """A fixed list of 64-bit registers read or written in one uc_reg_{read,write}_batch call,
    with the ctypes arrays built once (the binding's batch helpers rebuild them each time)."""

    def __init__(self, uc: Uc, names: tuple[str, ...]):
        self.handle = uc._uch
        self.count = len(names)
        self.ids = (ctypes.c_int * self.count)(*(REGISTER_IDS[name] for name in names))
        self.values = (ctypes.c_uint64 * self.count)()
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * self.count)(*(base + 8 * i for i in range(self.count)))

    def read(self) -> list[int]:
        status = uclib.uc_reg_read_batch(self.handle, self.ids, self.pointers, self.count)
        if status:
            raise UcError(status)
        return self.values[:]

    def write(self, values) -> None:
        self.values[:] = values
        status = uclib.uc_reg_write_batch(self.handle, self.ids, self.pointers, self.count)
        if status:
            raise UcError(status)


class SoftCpu:
    def __init__(self, machine):
        self.machine = machine
        self.uc = uc = machine.uc
        self.memory = machine.memory
        self._in_call = False
        self._values: dict[str, int] = {}
        self._dirty: dict[str, int] = {}
        self._syscall_rip = 0
        self._entry: list[int] = []
        self._prefetch = RegisterBatch(uc, PREFETCH)
        self._write_back = RegisterBatch(uc, WRITTEN_BACK)

    def enter_call(self) -> None:
        """The guest just executed `syscall`: RCX = the next instruction, R11 = RFLAGS."""
        self._in_call = True
        self._entry = self._prefetch.read()
        self._values = dict(zip(PREFETCH, self._entry))
        self._syscall_rip = self._values["rip"]
        self._dirty = {}
        self.write_register("rcx", self._values["rip"] + SYSCALL_LENGTH)
        self.write_register("r11", self._values["rflags"])

    def leave_call(self) -> None:
        """Write back what the call changed. RIP only if the guest is not to go on after its
        `syscall` (unicorn moves RIP on by 2 after the hook, also past a RIP written here);
        writing it makes unicorn leave its translated block."""
        self._in_call = False
        values, dirty = self._values, self._dirty
        self._write_back.write([values[name] for name in WRITTEN_BACK])
        after_syscall = self._syscall_rip + SYSCALL_LENGTH
        resume = dirty.pop("rip", after_syscall)
        if resume != after_syscall:
            self.uc.reg_write(X.UC_X86_REG_RIP, (resume - SYSCALL_LENGTH) & MASK64)
        for name in dirty.keys() - WRITTEN_BACK:
            self.uc.reg_write(REGISTER_IDS[name], dirty[name])
        self._dirty = {}

    def read_register(self, name: str) -> int:
        try:
            return self._values[name]
        except KeyError:
            value = self._values[name] = self.uc.reg_read(REGISTER_IDS[name])
            return value

    def call_at_entry(self) -> tuple[int, tuple[int, ...]]:
        """The number and arguments of the call, as the guest made it."""
        return self._entry[0], tuple(self._entry[1:7])

    def write_register(self, name: str, value: int) -> None:
        self._values[name] = self._dirty[name] = value & MASK64

    def return_to_user(self, result: int) -> None:
        """As `sysretq`: RAX = result, RIP = RCX, RFLAGS from R11 (the guest never left
        ring 3 here, so CS and SS are unchanged)."""
        self.write_register("rax", result)
        self.write_register("rip", self.read_register("rcx"))
        self.write_register("rflags",
                            (self.read_register("r11") & SYSRET_RFLAGS_MASK) | x86.RFLAGS_FIXED)

    def resume_registers(self) -> dict[str, int] | None:
        """Inside a call: the general registers as the guest will resume (what a capture
        must see; unicorn's own RIP is still on the `syscall`). None outside a call."""
        if not self._in_call:
            return None
        values = dict(self._values)
        values["rip"] = self._dirty.get("rip", self._syscall_rip + SYSCALL_LENGTH)
        return values

    def protect(self, addr: int, length: int, prot: int) -> bool:
        from machine.protection import protect
        with self.machine.tables_lock:
            return protect(self.memory, addr, length, prot, self.machine.forget_translations)

    def read_fpu(self) -> bytes:
        from .unicorn_state import xsave_area
        return xsave_area(self.uc, self.machine.template.xsave)

    def write_fpu(self, data: bytes) -> None:
        from .unicorn_state import write_legacy_fpu
        write_legacy_fpu(self.uc, data)

    def fork(self) -> int:
        return self.machine.fork()

    def enter_fault(self) -> None:
        """The guest faulted (outside any hook): load its registers for a signal handler."""
        names = [name for name in REGISTER_IDS if name not in ("fs_base", "gs_base")]
        self._values = dict(zip(names, self.uc.reg_read_batch([REGISTER_IDS[n] for n in names])))
        self._dirty = {}

    def leave_fault(self) -> None:
        """Write back what the handler's entry changed, RIP as it is (no hook adds to it)."""
        for name, value in self._dirty.items():
            self.uc.reg_write(REGISTER_IDS[name], value)
        self._dirty = {}

    def exec(self, host_path: str, argv: list[str], envp: list[str]):
        space, regs = self.machine.exec(host_path, argv, envp)
        for name in REGISTER_IDS:
            if name not in ("fs_base", "gs_base"):
                self.write_register(name, getattr(regs, name))
        self.write_register("fs_base", 0)
        self.write_register("gs_base", 0)
        return space

    def rewind_to_syscall(self) -> int:
        """Put the guest back on its `syscall` instruction (to re-issue the call when it
        resumes); returns that address."""
        rip = self.read_register("rcx") - SYSCALL_LENGTH
        self.write_register("rip", rip)
        return rip
