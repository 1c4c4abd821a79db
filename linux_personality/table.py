"""The system-call table: handlers registered by number, with a name and argument kinds (the
kinds drive --trace's formatting, see trace.py). A handler takes the Personality and the raw
argument registers and returns the value for RAX: a result, or a negative errno."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Syscall:
    nr: int
    name: str
    kinds: tuple[str, ...]
    handler: Callable[..., int]


SYSCALLS: dict[int, Syscall] = {}


def syscall(nr: int, name: str, kinds: str = ""):
    def register(handler):
        SYSCALLS[nr] = Syscall(nr, name, tuple(kinds.split()), handler)
        return handler
    return register


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def signed64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >> 63 else value
