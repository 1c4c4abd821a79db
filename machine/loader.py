"""Load a static x86-64 Linux executable into guest memory and build its initial stack.

The checks give one-line reasons a user can act on: not ELF, 32-bit, another machine,
dynamically linked, position-independent, or larger than the guest's memory.
"""

from __future__ import annotations

import os
import struct

from vmstate import elf
from vmstate.errors import ProgramError
from vmstate.fd import open_to_read
from vmstate.record import record
from vmstate.state import PAGE_SIZE

from linux_personality.address_space import page_up

from .layout import USER_START, VDSO_ADDR
from .memory import GuestMemory

# Auxiliary vector keys (<elf.h>) that musl and glibc static startup code read.
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_ENTRY = 0, 3, 4, 5, 6, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_CLKTCK, AT_SECURE, AT_RANDOM, AT_EXECFN = (
    11, 12, 13, 14, 17, 23, 25, 31)
AT_SYSINFO_EHDR = 33


@record
class Segment:
    vaddr: int
    file_offset: int
    file_size: int
    mem_size: int


@record
class Program:
    path: str
    entry: int
    segments: tuple[Segment, ...]
    phdr_addr: int
    phent: int
    phnum: int

    @property
    def end(self) -> int:
        return max(s.vaddr + s.mem_size for s in self.segments)


def inspect_program(path: str) -> Program:
    """Parse and validate the ELF headers (no guest needed)."""
    fd = open_to_read(path, "file", ProgramError)
    try:
        header = os.pread(fd, elf.EHDR.size, 0)
        if header[:4] != elf.ELF_MAGIC:
            raise ProgramError(f"{path}: not an ELF executable")
        if len(header) > 4 and header[4] != elf.ELFCLASS64:
            raise ProgramError(f"{path}: 32-bit ELF; vmstate runs x86-64 (64-bit) programs only")
        if len(header) < elf.EHDR.size:
            raise ProgramError(f"{path}: corrupt ELF file (the header is cut short)")
        (ident, e_type, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _, _) = \
            elf.EHDR.unpack(header)
        if ident[5] != elf.ELFDATA2LSB or machine != elf.EM_X86_64:
            name = elf.EM_NAMES.get(machine, f"machine {machine}") \
                if ident[5] == elf.ELFDATA2LSB else "a big-endian machine"
            raise ProgramError(f"{path}: ELF for {name}, not x86-64")
        if phentsize != elf.PHDR.size and phnum:
            raise ProgramError(f"{path}: corrupt ELF file (program header size {phentsize})")
        table = os.pread(fd, phnum * elf.PHDR.size, phoff)
        if len(table) != phnum * elf.PHDR.size:
            raise ProgramError(f"{path}: corrupt ELF file (the program headers run past its "
                               "end)")
    finally:
        os.close(fd)
    return _program(path, e_type, entry, phoff, phnum, table)


def _program(path: str, e_type: int, entry: int, phoff: int, phnum: int,
             table: bytes) -> Program:
    segments, phdr_addr, interp = [], None, False
    for kind, _, offset, vaddr, _, filesz, memsz, _ in elf.PHDR.iter_unpack(table):
        if kind == elf.PT_INTERP:
            interp = True
        elif kind == elf.PT_PHDR:
            phdr_addr = vaddr
        elif kind == elf.PT_LOAD and memsz:
            segments.append(Segment(vaddr, offset, filesz, memsz))
    if interp:
        raise ProgramError(f"{path}: dynamically linked; build it with musl-gcc -static")
    if e_type == elf.ET_DYN:
        raise ProgramError(f"{path}: position-independent executable (PIE); link with "
                           "-static -no-pie")
    if e_type != elf.ET_EXEC or not segments:
        raise ProgramError(f"{path}: not an executable "
                           f"({elf.ET_NAMES.get(e_type, f'type {e_type}')})")
    if phdr_addr is None:   # the headers lie inside the first segment that maps file offset e_phoff
        phdr_addr = next((s.vaddr + phoff - s.file_offset for s in segments
                          if s.file_offset <= phoff < s.file_offset + s.file_size), 0)
    return Program(path, entry, tuple(segments), phdr_addr, elf.PHDR.size, phnum)


def load_program(program: Program, memory: GuestMemory, limit: int) -> None:
    """Copy the loadable segments into guest memory (bss is already zero in fresh memory)."""
    for seg in program.segments:
        if seg.vaddr < USER_START or seg.vaddr + seg.mem_size > limit:
            raise ProgramError(
                f"{program.path}: segment at {seg.vaddr:#x}-{seg.vaddr + seg.mem_size:#x} does "
                f"not fit in guest memory {USER_START:#x}-{limit:#x} (try a larger --memory)")
    with open(program.path, "rb") as f:
        for seg in program.segments:
            memory.write_phys(seg.vaddr, os.pread(f.fileno(), seg.file_size, seg.file_offset))


def build_stack(memory: GuestMemory, program: Program, argv: list[str], stack_top: int,
                envp: list[str] = ()) -> int:
    """Write argc, argv, envp and the auxiliary vector below `stack_top`; return the initial
    RSP (16-byte aligned, pointing at argc), as the Linux ELF loader does."""
    strings = bytearray()
    offsets = []
    for arg in [*argv, *envp]:
        offsets.append(len(strings))
        strings += os.fsencode(arg) + b"\0"
    random_offset = len(strings)
    strings += os.urandom(16)
    area = (stack_top - len(strings)) & ~0xF
    memory.write_phys(area, bytes(strings))
    pointers = [area + off for off in offsets]
    arg_ptrs, env_ptrs = pointers[:len(argv)], pointers[len(argv):]
    auxv = [AT_PHDR, program.phdr_addr, AT_PHENT, program.phent, AT_PHNUM, program.phnum,
            AT_PAGESZ, PAGE_SIZE, AT_ENTRY, program.entry, AT_UID, 0, AT_EUID, 0, AT_GID, 0,
            AT_EGID, 0, AT_SECURE, 0, AT_CLKTCK, 100, AT_RANDOM, area + random_offset,
            AT_EXECFN, arg_ptrs[0], AT_SYSINFO_EHDR, VDSO_ADDR, AT_NULL, 0]
    words = [len(argv), *arg_ptrs, 0, *env_ptrs, 0, *auxv]   # argc, argv, NULL, envp, NULL, auxv
    rsp = (area - 8 * len(words)) & ~0xF
    memory.write_phys(rsp, struct.pack(f"<{len(words)}Q", *words))
    return rsp


def heap_start(program: Program) -> int:
    return page_up(program.end)
