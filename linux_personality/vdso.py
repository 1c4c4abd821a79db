"""The vDSO: the small shared object Linux maps into every process and names in the auxiliary
vector (AT_SYSINFO_EHDR). libcs look their fast time functions up in it by symbol: dietlibc
needs it (without one it parses the legacy vsyscall address 0xffffffffff600000 as an ELF
header and faults), musl and glibc use it when it is there.

Each function here is `mov $nr, %eax; syscall; ret`: the VMM serves the call like any
other (Linux's own vDSO falls back to the same system calls), so the page holds no data that
changes and needs no state of its own. The image is a complete ET_DYN object linked at 0 (a
reader adds the address it finds it at): program headers (PT_LOAD, PT_DYNAMIC), a dynamic
section with a SysV hash table, symbols versioned LINUX_2.6 as on x86-64 Linux, and section
headers (dietlibc finds .dynsym/.dynstr through them). It fits one page.

    0x000 ELF header, program headers   then .hash .dynsym .dynstr .gnu.version
    .gnu.version_d .text .dynamic, the section-name table and the section headers
"""

from __future__ import annotations

import struct

from vmstate import elf

SONAME, VERSION = b"linux-vdso.so.1", b"LINUX_2.6"
# (symbol, system call): what x86-64 Linux's vDSO exports.
FUNCTIONS = ((b"__vdso_clock_gettime", 228), (b"__vdso_gettimeofday", 96),
             (b"__vdso_time", 201), (b"__vdso_getcpu", 309), (b"__vdso_clock_getres", 229))
STUB_SIZE = 8
PAGE = 4096


def _stub(nr: int) -> bytes:
    """mov $nr, %eax; syscall; ret"""
    return (b"\xb8" + struct.pack("<I", nr) + b"\x0f\x05\xc3").ljust(STUB_SIZE, b"\xcc")


class _Strings:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")

    def add(self, name: bytes) -> int:
        offset = len(self.data)
        self.data += name + b"\0"
        return offset


def _align(value: int, alignment: int = 8) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# (name, contents key, type, flags, link, info, entry size), in section-header order (index
# 0 is the null section); links name .dynsym (2) or .dynstr (3)
_ALLOC, _CODE = elf.SHF_ALLOC, elf.SHF_ALLOC | elf.SHF_EXECINSTR
SECTIONS = (
    (".hash", "hash", elf.SHT_HASH, _ALLOC, 2, 0, 4),
    (".dynsym", "dynsym", elf.SHT_DYNSYM, _ALLOC, 3, 1, elf.SYM.size),
    (".dynstr", "dynstr", elf.SHT_STRTAB, _ALLOC, 0, 0, 0),
    (".gnu.version", "versym", elf.SHT_GNU_VERSYM, _ALLOC, 2, 0, 2),
    (".gnu.version_d", "verdef", elf.SHT_GNU_VERDEF, _ALLOC, 3, 2, 0),
    (".text", "text", elf.SHT_PROGBITS, _CODE, 0, 0, 0),
    (".dynamic", "dynamic", elf.SHT_DYNAMIC, _ALLOC, 3, 0, elf.DYN.size),
)
TEXT_INDEX = 6
DYNAMIC_ENTRIES = 10


def _hash_table(nsyms: int) -> bytes:
    """SysV DT_HASH with one bucket holding every symbol in one chain: valid for any lookup."""
    chain = [i + 1 if i + 1 < nsyms else 0 for i in range(1, nsyms)]
    return struct.pack(f"<{3 + nsyms}I", 1, nsyms, 1, 0, *chain)


def _version_definitions(soname: int, version: int) -> bytes:
    """Version 1: the object itself (VER_FLG_BASE); version 2: LINUX_2.6."""
    return (elf.VERDEF.pack(1, elf.VER_FLG_BASE, 1, 1, elf.sysv_hash(SONAME), elf.VERDEF.size,
                            elf.VERDEF.size + elf.VERDAUX.size)
            + elf.VERDAUX.pack(soname, 0)
            + elf.VERDEF.pack(1, 0, 2, 1, elf.sysv_hash(VERSION), elf.VERDEF.size, 0)
            + elf.VERDAUX.pack(version, 0))


def _place(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    """Each part's offset (= its address: the object is linked at 0), after the ELF and
    program headers; and where the parts end."""
    layout, offset = {}, elf.EHDR.size + 2 * elf.PHDR.size
    for key, size in sizes.items():
        offset = _align(offset, 16 if key == "text" else 8)
        layout[key] = offset
        offset += size
    return layout, offset


def _contents(layout: dict[str, int], dynstr: _Strings, soname: int, version: int,
              names: list[int]) -> dict[str, bytes]:
    nsyms = len(FUNCTIONS) + 1
    symbols = elf.SYM.pack(0, 0, 0, 0, 0, 0) + b"".join(
        elf.SYM.pack(name, elf.STB_GLOBAL << 4 | elf.STT_FUNC, 0, TEXT_INDEX,
                     layout["text"] + i * STUB_SIZE, STUB_SIZE) for i, name in enumerate(names))
    dynamic = b"".join(elf.DYN.pack(tag, value) for tag, value in (
        (elf.DT_HASH, layout["hash"]), (elf.DT_STRTAB, layout["dynstr"]),
        (elf.DT_SYMTAB, layout["dynsym"]), (elf.DT_STRSZ, len(dynstr.data)),
        (elf.DT_SYMENT, elf.SYM.size), (elf.DT_SONAME, soname),
        (elf.DT_VERSYM, layout["versym"]), (elf.DT_VERDEF, layout["verdef"]),
        (elf.DT_VERDEFNUM, 2), (elf.DT_NULL, 0)))
    return {"hash": _hash_table(nsyms), "dynsym": symbols, "dynstr": bytes(dynstr.data),
            "versym": struct.pack(f"<{nsyms}H", 0, *[2] * len(FUNCTIONS)),
            "verdef": _version_definitions(soname, version),
            "text": b"".join(_stub(nr) for _, nr in FUNCTIONS), "dynamic": dynamic}


def _section_headers(layout: dict[str, int], contents: dict[str, bytes],
                     shstrtab_offset: int) -> tuple[list[bytes], bytes]:
    """The section headers (the last one .shstrtab's) and the section-name table."""
    shstr = _Strings()
    headers = [elf.SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for title, key, kind, flags, link, info, entsize in SECTIONS:
        headers.append(elf.SHDR.pack(shstr.add(title.encode()), kind, flags, layout[key],
                                     layout[key], len(contents[key]), link, info,
                                     16 if key == "text" else 8, entsize))
    name = shstr.add(b".shstrtab")
    headers.append(elf.SHDR.pack(name, elf.SHT_STRTAB, 0, 0, shstrtab_offset,
                                 len(shstr.data), 0, 0, 1, 0))
    return headers, bytes(shstr.data)


def build() -> bytes:
    """The vDSO's bytes (at most one page)."""
    dynstr = _Strings()
    soname, version = dynstr.add(SONAME), dynstr.add(VERSION)
    names = [dynstr.add(name) for name, _ in FUNCTIONS]
    nsyms = len(FUNCTIONS) + 1
    sizes = {"hash": 4 * (3 + nsyms), "dynsym": nsyms * elf.SYM.size, "dynstr": len(dynstr.data),
             "versym": 2 * nsyms, "verdef": 2 * (elf.VERDEF.size + elf.VERDAUX.size),
             "text": len(FUNCTIONS) * STUB_SIZE, "dynamic": DYNAMIC_ENTRIES * elf.DYN.size}
    layout, shstrtab_offset = _place(sizes)
    contents = _contents(layout, dynstr, soname, version, names)
    assert {key: len(data) for key, data in contents.items()} == sizes
    headers, shstrtab = _section_headers(layout, contents, shstrtab_offset)
    shoff = _align(shstrtab_offset + len(shstrtab))
    size = shoff + len(headers) * elf.SHDR.size
    assert size <= PAGE

    image = bytearray(size)
    ident = elf.ELF_MAGIC + bytes([elf.ELFCLASS64, elf.ELFDATA2LSB, elf.EV_CURRENT,
                                   elf.ELFOSABI_SYSV])
    image[:elf.EHDR.size] = elf.EHDR.pack(
        ident.ljust(16, b"\0"), elf.ET_DYN, elf.EM_X86_64, elf.EV_CURRENT, layout["text"],
        elf.EHDR.size, shoff, 0, elf.EHDR.size, elf.PHDR.size, 2, elf.SHDR.size, len(headers),
        len(headers) - 1)
    dynamic = layout["dynamic"], len(contents["dynamic"])
    image[elf.EHDR.size:elf.EHDR.size + 2 * elf.PHDR.size] = (
        elf.PHDR.pack(elf.PT_LOAD, elf.PF_R | elf.PF_X, 0, 0, 0, size, size, PAGE)
        + elf.PHDR.pack(elf.PT_DYNAMIC, elf.PF_R, dynamic[0], dynamic[0], dynamic[0],
                        dynamic[1], dynamic[1], 8))
    for key, data in contents.items():
        image[layout[key]:layout[key] + len(data)] = data
    image[shstrtab_offset:shstrtab_offset + len(shstrtab)] = shstrtab
    image[shoff:] = b"".join(headers)
    return bytes(image)


IMAGE = build()
