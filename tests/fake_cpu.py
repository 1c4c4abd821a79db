"""A CPU for testing the Linux personality in-process, without KVM: registers in a dict and
guest user memory in a bytearray (guest address = USER_START + offset)."""

from __future__ import annotations

import struct

from linux_personality.cpu import GuestFault

USER_START = 0x200000


class FakeMemory:
    def __init__(self, size: int = 1 << 20):
        self.data = bytearray(size)
        self.user_start, self.user_end = USER_START, USER_START + size
        self.written: set[int] = set()

    def check(self, addr: int, length: int) -> None:
        if length and (length < 0 or addr < self.user_start or addr + length > self.user_end):
            raise GuestFault(f"bad pointer {addr:#x}+{length}")

    def _slice(self, addr: int, length: int) -> slice:
        self.check(addr, length)
        return slice(addr - USER_START, addr - USER_START + length)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.data[self._slice(addr, length)])

    def write(self, addr: int, data) -> None:
        self.data[self._slice(addr, len(data))] = data
        self.mark_written(addr, len(data))

    def zero(self, addr: int, length: int) -> None:
        self.write(addr, bytes(length))

    def user_view(self, addr: int, length: int) -> memoryview:
        return memoryview(self.data)[self._slice(addr, length)]

    def mark_written(self, addr: int, length: int) -> None:
        self.written.update(range(addr >> 12, (addr + max(length, 0) + 4095) >> 12))

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        self.check(addr, 1)
        start = addr - USER_START
        end = self.data.find(b"\0", start, min(start + limit, len(self.data)))
        if end < 0:
            raise GuestFault("unterminated")
        return bytes(self.data[start:end])

    # test conveniences ------------------------------------------------------------------
    def put(self, addr: int, data: bytes) -> int:
        self.write(addr, data)
        return addr

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]


class FakeCpu:
    def __init__(self, memory: FakeMemory):
        self.memory = memory
        self.registers: dict[str, int] = {"rcx": 0x401000, "r11": 0x202}
        self.returns: list[int] = []
        self.fpu = bytes(range(256)) * 2          # a recognisable 512-byte FXSAVE area

    def read_register(self, name: str) -> int:
        return self.registers.get(name, 0)

    def write_register(self, name: str, value: int) -> None:
        self.registers[name] = value

    def read_fpu(self) -> bytes:
        return self.fpu

    def write_fpu(self, data: bytes) -> None:
        self.fpu = bytes(data)

    def return_to_user(self, result: int) -> None:
        self.registers["rax"] = result & (2**64 - 1)
        self.registers["rip"] = self.registers["rcx"]
        self.returns.append(result)
