"""What a Linux process core says about the process, found in guest memory: the auxiliary
vector the loader built on the initial stack, and the program's file mappings (from the
program headers the auxiliary vector points at).

The initial stack is found as Linux lays it out (System V x86-64 ABI, 3.4.1): argc, then argc
pointers to the argument strings, NULL, the environment pointers, NULL, then (type, value)
pairs ending with AT_NULL. It is searched for near the top of the stack (`user_end`), by argc
and the argument strings the VMM recorded, so it does not depend on exactly where the loader
put it."""

from __future__ import annotations

import os
import struct

from .elf import PHDR, PT_LOAD
from .errors import VmstateError
from .paging import PageTables
from .record import record
from .state import PAGE_SIZE, VmState

AT_NULL, AT_PHDR, AT_PHNUM = 0, 3, 5
STACK_SEARCH = 64 << 10           # bytes below the top of the stack searched
MAX_AUXV = 64                     # pairs
MAX_ENVIRONMENT = 4096            # pointers
MAX_PHNUM = 256
WORD = struct.Struct("<Q")
AUXV_ENTRY = struct.Struct("<QQ")    # type, value


@record
class FileMapping:
    start: int
    end: int
    page_offset: int              # in pages, as NT_FILE has it


class GuestMemoryReader:
    """Reads guest virtual memory through the first vCPU's page tables."""

    def __init__(self, state: VmState, read_phys):
        s = state.vcpus[0].sregs
        self.read_phys = read_phys
        self.tables = PageTables(read_phys, s.cr3, s.cr0, s.cr4, s.efer)

    def read(self, virtual: int, length: int) -> bytes | None:
        out = bytearray()
        while len(out) < length:
            address = virtual + len(out)
            physical = self.tables.translate(address)
            if physical is None:
                return None
            chunk = min(length - len(out), PAGE_SIZE - address % PAGE_SIZE)
            out += self.read_phys(physical, chunk)
        return bytes(out)


def auxiliary_vector(state: VmState, memory: GuestMemoryReader) -> bytes | None:
    """The (type, value) u64 pairs through AT_NULL, as NT_AUXV holds them; None if the initial
    stack cannot be found."""
    argv = [os.fsencode(arg) for arg in state.vmm.argv]
    top = state.vmm.address_space.user_end
    base = max(top - STACK_SEARCH, 0)
    block = memory.read(base, top - base) if argv and top else None
    if block is None:
        return None
    words = [w for (w,) in WORD.iter_unpack(block[:len(block) // 8 * 8])]
    for index in range(len(words) - len(argv) - 2, -1, -1):
        if words[index] == len(argv) and _arguments_match(words, index, argv, block, base):
            return _pairs(words, index + len(argv) + 2)
    return None


def _arguments_match(words, index, argv, block, base) -> bool:
    if words[index + len(argv) + 1] != 0:
        return False
    for pointer, arg in zip(words[index + 1:], argv):
        start = pointer - base
        if not 0 <= start <= len(block) - len(arg) - 1 or block[start:start + len(arg) + 1] \
                != arg + b"\0":
            return False
    return True


def _pairs(words, position) -> bytes | None:
    """Skip the environment, then take the auxiliary vector through AT_NULL."""
    for _ in range(MAX_ENVIRONMENT):
        if position >= len(words):
            return None
        position += 1
        if words[position - 1] == 0:
            break
    pairs = []
    for _ in range(MAX_AUXV):
        if position + 1 >= len(words):
            return None
        pairs.append((words[position], words[position + 1]))
        position += 2
        if pairs[-1][0] == AT_NULL:
            return b"".join(AUXV_ENTRY.pack(*pair) for pair in pairs)
    return None


def program_mappings(auxv: bytes, memory: GuestMemoryReader) -> list[FileMapping]:
    """The program file's loaded segments (PT_LOAD, the file-backed part), read from the
    program headers at AT_PHDR in guest memory."""
    values = dict(AUXV_ENTRY.iter_unpack(auxv))
    phdr, phnum = values.get(AT_PHDR), values.get(AT_PHNUM, 0)
    if not phdr or not 0 < phnum <= MAX_PHNUM:
        return []
    table = memory.read(phdr, phnum * PHDR.size)
    if table is None:
        return []
    mappings = []
    for p_type, _, offset, vaddr, _, filesz, _, _ in PHDR.iter_unpack(table):
        if p_type == PT_LOAD and filesz:
            start = vaddr - vaddr % PAGE_SIZE
            end = -(-(vaddr + filesz) // PAGE_SIZE) * PAGE_SIZE
            mappings.append(FileMapping(start, end, (offset - offset % PAGE_SIZE) // PAGE_SIZE))
    return mappings


def guest_memory(state: VmState, read_phys) -> GuestMemoryReader | None:
    try:
        return GuestMemoryReader(state, read_phys)
    except VmstateError:
        return None
