"""ELF64 structures for x86-64 core files and the executables the VMM loads, each declared
once (see schemas/core-format.md)."""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV = 2, 1, 1, 0
ET_REL, ET_EXEC, ET_DYN, ET_CORE, EM_X86_64 = 1, 2, 3, 4, 62
PT_LOAD, PT_INTERP, PT_NOTE, PT_PHDR = 1, 3, 4, 6
ET_NAMES = {0: "ET_NONE", ET_REL: "ET_REL", ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN",
            ET_CORE: "ET_CORE"}
EM_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390",
            40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS, NT_FPREGSET, NT_PRPSINFO, NT_AUXV, NT_X86_XSTATE = 1, 2, 3, 6, 0x202
NT_SIGINFO, NT_FILE = 0x53494749, 0x46494C45        # "SIGI", "FILE"

# e_ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")            # namesz, descsz, type
MAX_PHNUM = 0xFFFF - 1                  # PN_XNUM (0xffff) would need section 0; we stay below
# sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign,
# sh_entsize
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")          # st_name, st_info, st_other, st_shndx, st_value, st_size
DYN = struct.Struct("<qQ")              # d_tag, d_val
# Elf64_Verdef: vd_version, vd_flags, vd_ndx, vd_cnt, vd_hash, vd_aux, vd_next; Elf64_Verdaux:
# vda_name, vda_next
VERDEF = struct.Struct("<HHHHIII")
VERDAUX = struct.Struct("<II")
PT_DYNAMIC = 2
SHT_PROGBITS, SHT_STRTAB, SHT_HASH, SHT_DYNAMIC, SHT_DYNSYM = 1, 3, 5, 6, 11
SHT_GNU_VERDEF, SHT_GNU_VERSYM = 0x6FFFFFFD, 0x6FFFFFFF
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 0, 4, 5, 6, 10, 11, 14
DT_VERSYM, DT_VERDEF, DT_VERDEFNUM = 0x6FFFFFF0, 0x6FFFFFFC, 0x6FFFFFFD
STB_GLOBAL, STT_FUNC, VER_FLG_BASE = 1, 2, 1

# struct elf_prstatus (x86-64): siginfo (signo, code, errno), cursig, sigpend, sighold,
# pid, ppid, pgrp, sid, utime, stime, cutime, cstime (timevals), 27 registers, fpvalid.
PRSTATUS = struct.Struct("<iiih2xQQiiii64x27Qi4x")
# The 27 registers of user_regs_struct, in order.
PRSTATUS_REGISTERS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                      "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
                      "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
# struct elf_prpsinfo: state, sname, zomb, nice, flag, uid, gid, pid, ppid, pgrp, sid,
# fname[16], psargs[80]
PRPSINFO = struct.Struct("<bcbb4xQIIiiii16s80s")
# siginfo_t: si_signo, si_errno, si_code, and the rest of its 128 bytes.
SIGINFO = struct.Struct("<iii116x")
# NT_FILE: count, page size; then count x (start, end, file offset in pages); then count
# NUL-terminated file names.
FILE_NOTE_HEADER = struct.Struct("<QQ")
FILE_NOTE_ENTRY = struct.Struct("<QQQ")
XSAVE_XCR0_OFFSET = 464                 # where Linux (and gdb) keep XCR0 in an XSTATE note

assert EHDR.size == 64 and PHDR.size == 56 and PRSTATUS.size == 336 and PRPSINFO.size == 136
assert SIGINFO.size == 128
assert SHDR.size == 64 and SYM.size == 24 and DYN.size == 16 and VERDEF.size == 20


def sysv_hash(name: bytes) -> int:
    """The System V ABI's ELF hash of a symbol or version name (DT_HASH, vd_hash)."""
    h = 0
    for byte in name:
        h = (h << 4) + byte
        h ^= (h >> 24) & 0xF0
        h &= 0x0FFFFFFF
    return h


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    name += b"\0"
    return (NHDR.pack(len(name), len(desc), kind) + name.ljust(_pad4(len(name)), b"\0")
            + desc.ljust(_pad4(len(desc)), b"\0"))


def iter_notes(data: bytes):
    """(name, type, descriptor) of each note in a PT_NOTE segment's bytes."""
    position = 0
    while position + NHDR.size <= len(data):
        namesz, descsz, kind = NHDR.unpack_from(data, position)
        position += NHDR.size
        name = data[position:position + namesz].rstrip(b"\0")
        position += _pad4(namesz)
        desc = data[position:position + descsz]
        if len(desc) != descsz:
            raise ValueError(f"note {name!r} runs past the end of its segment")
        position += _pad4(descsz)
        yield name, kind, desc


def _pad4(n: int) -> int:
    return (n + 3) & ~3
