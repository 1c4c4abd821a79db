"""The ELF core file of `vmstate split`: guest memory and registers for debuggers.

    ELF header | program headers | notes | guest physical memory (page aligned, sparse)

- PT_NOTE: per vCPU NT_PRSTATUS, NT_FPREGSET and NT_X86_XSTATE (gdb's threads), one
  NT_PRPSINFO, and a private "VMSTATE" note holding the source image's metadata (every
  register, MSR, device and memory checksum), so the core alone loses nothing.
- PT_LOAD, one per run of the guest's page tables (p_vaddr virtual, p_paddr physical), then one
  per memory region at DIRECT_MAP_BASE + physical address, like Linux's direct map: every byte
  of guest physical memory, mapped or not, is in a segment. All segments point into the one
  copy of physical memory, so a write through any alias is seen through all of them. Absent
  pages are holes in the file but inside segments, so gdb can write to them too.

schemas/core-format.md describes the layout in full.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from . import elf, xsave
from .atomic import atomic_output
from .errors import FormatError, ImageError, VmstateError
from .fd import FdOwner, open_to_read, pwrite_all
from .image.reader import Image, ImageMetadata
from .image.writer import RegionMemory, write_runs
from .paging import Mapping, PageTables, clip
from .process import FileMapping, auxiliary_vector, guest_memory, program_mappings
from .progress import progress_bar
from .record import record
from .state import PAGE_SIZE, VcpuState, VmState

NOTE_NAME = b"VMSTATE"
NT_VMSTATE_IMAGE = 0x564D5354     # "VMST": BFD reads small note types as Linux ones, whatever
                                  # the note's name, so ours stays far from them
IMAGE_NOTE = struct.Struct("<II")      # note format version, reserved; image metadata follows
IMAGE_NOTE_VERSION = 1
DIRECT_MAP_BASE = 0xFFFF_8880_0000_0000
DIRECT_MAP_SIZE = (1 << 64) - DIRECT_MAP_BASE       # the guest physical addresses it can show
SIGSTOP, SI_USER = 19, 0
PID_BASE = 1


class CoreError(FormatError):
    pass


@record
class Segment:
    vaddr: int
    paddr: int
    offset: int
    size: int
    flags: int


# -- writing (split) ---------------------------------------------------------------------------

def _prstatus(vcpu: VcpuState, orig_rax: int) -> bytes:
    regs, s = vcpu.regs, vcpu.sregs
    values = {**{name: getattr(regs, name) for name in ("r15", "r14", "r13", "r12", "rbp", "rbx",
                                                          "r11", "r10", "r9", "r8", "rax", "rcx",
                                                          "rdx", "rsi", "rdi", "rip", "rsp")},
              "orig_rax": orig_rax, "eflags": regs.rflags, "cs": s.cs.selector,
              "ss": s.ss.selector, "ds": s.ds.selector, "es": s.es.selector,
              "fs": s.fs.selector, "gs": s.gs.selector, "fs_base": s.fs.base,
              "gs_base": s.gs.base}
    pid = min(PID_BASE + vcpu.id, 0x7FFFFFFF)
    return elf.PRSTATUS.pack(SIGSTOP, 0, 0, SIGSTOP, 0, 0, pid, 0, pid, pid,
                             *(values[name] for name in elf.PRSTATUS_REGISTERS), 1)


def _prpsinfo(state: VmState) -> bytes:
    name = os.fsencode(os.path.basename(state.vmm.program))[:15]
    args = b" ".join(os.fsencode(arg) for arg in state.vmm.argv)[:79]
    return elf.PRPSINFO.pack(ord("T") & 0x7F, b"T", 0, 0, 0, 0, 0, PID_BASE, 0, PID_BASE,
                             PID_BASE, name, args)


def _xstate(vcpu: VcpuState) -> bytes:
    """The XSAVE area as Linux writes it: XCR0 where gdb looks for it (x87 and SSE always count
    as enabled, since the legacy region holds them), cut to the size XCR0 implies."""
    xcr0 = dict(vcpu.xcrs).get(0, 0) | 0x3
    size = _xsave_size(vcpu, xcr0)
    area = bytearray(vcpu.xsave.ljust(size, b"\0")[:size])
    area[elf.XSAVE_XCR0_OFFSET:elf.XSAVE_XCR0_OFFSET + 8] = struct.pack("<Q", xcr0)
    return bytes(area)


def _xsave_size(vcpu: VcpuState, xcr0: int) -> int:
    """Standard-format XSAVE size for the components in xcr0: the legacy region and header,
    then each extended component where CPUID leaf 0xD puts it."""
    size = xsave.XSAVE_HEADER_OFFSET + xsave.XSAVE_HEADER_SIZE
    for entry in vcpu.cpuid:
        if entry.function == 0xD and entry.index >= 2 and xcr0 >> entry.index & 1:
            size = max(size, entry.ebx + entry.eax)
    return size


def _siginfo() -> bytes:
    """The signal the process stopped with, as NT_PRSTATUS says: SIGSTOP, sent by the user."""
    return elf.SIGINFO.pack(SIGSTOP, 0, SI_USER)


def _file_note(state: VmState, mappings: list[FileMapping]) -> bytes:
    """NT_FILE: the program's file-backed mappings, so tools find (and match) the executable."""
    name = os.fsencode(state.vmm.program) + b"\0"
    return (elf.FILE_NOTE_HEADER.pack(len(mappings), PAGE_SIZE)
            + b"".join(elf.FILE_NOTE_ENTRY.pack(m.start, m.end, m.page_offset)
                       for m in mappings)
            + name * len(mappings))


@record
class Process:
    """What the guest's memory says about the process: the auxiliary vector the loader built
    (None if the initial stack was not found) and the program's file mappings."""
    auxv: bytes | None
    files: list[FileMapping]


def find_process(image: Image) -> Process:
    memory = guest_memory(image.state, image.read_phys)
    auxv = auxiliary_vector(image.state, memory) if memory else None
    return Process(auxv, program_mappings(auxv, memory) if auxv else [])


def _process_notes(state: VmState, process: Process) -> list[bytes]:
    """NT_SIGINFO, NT_AUXV and NT_FILE, as a Linux process core has them after NT_PRPSINFO;
    the last two only when found in guest memory."""
    notes = [elf.note(b"CORE", elf.NT_SIGINFO, _siginfo())]
    if process.auxv is not None:
        notes.append(elf.note(b"CORE", elf.NT_AUXV, process.auxv))
    if process.files:
        notes.append(elf.note(b"CORE", elf.NT_FILE, _file_note(state, process.files)))
    return notes


def _split_at_files(mappings: list[Mapping], files: list[FileMapping]) -> list[Mapping]:
    """Mappings cut where the program's file mappings start and end, so that, as in a Linux
    core, a segment begins where the program's ELF header is (tools look for it there)."""
    cuts = sorted({f.start for f in files} | {f.end for f in files})
    out = []
    for m in mappings:
        inside = [c for c in cuts if m.virtual < c < m.virtual + m.size]
        for start, end in zip([m.virtual, *inside], [*inside, m.virtual + m.size]):
            out.append(Mapping(start, m.physical + start - m.virtual, end - start, m.writable,
                               m.user, m.executable))
    return out


def _notes(image: ImageMetadata, process: Process) -> bytes:
    state = image.state
    parts = []
    first = state.vcpus[0].id
    for vcpu in state.vcpus:
        pending = state.vmm.pending
        orig_rax = pending.nr if pending is not None and vcpu.id == first else (1 << 64) - 1
        parts.append(elf.note(b"CORE", elf.NT_PRSTATUS, _prstatus(vcpu, orig_rax)))
        if vcpu.id == first:
            parts.append(elf.note(b"CORE", elf.NT_PRPSINFO, _prpsinfo(state)))
            parts += _process_notes(state, process)
        parts.append(elf.note(b"CORE", elf.NT_FPREGSET,
                              vcpu.xsave[:xsave.LEGACY_SIZE].ljust(xsave.LEGACY_SIZE, b"\0")))
        parts.append(elf.note(b"LINUX", elf.NT_X86_XSTATE, _xstate(vcpu)))
    note = IMAGE_NOTE.pack(IMAGE_NOTE_VERSION, 0) + image.metadata()
    parts.append(elf.note(NOTE_NAME, NT_VMSTATE_IMAGE, note))
    return b"".join(parts)


def guest_mappings(image: ImageMetadata, read_phys) -> list[Mapping]:
    """The first vCPU's virtual mappings, clipped to guest memory (the VMM's doorbell page,
    for one, maps a physical address with no memory behind it)."""
    s = image.state.vcpus[0].sregs
    try:
        tables = PageTables(read_phys, s.cr3, s.cr0, s.cr4, s.efer)
        mappings = list(tables.mappings())
    except VmstateError:
        return []
    pieces = (clip(m, region.guest_phys_addr, region.size)
              for m in mappings for region in image.state.memory)
    return [piece for piece in pieces if piece is not None]


def _flags(m: Mapping) -> int:
    return elf.PF_R | (elf.PF_W if m.writable else 0) | (elf.PF_X if m.executable else 0)


@record
class CoreLayout:
    header: bytes            # ELF header, program headers, notes
    segments: list[Segment]
    region_offsets: list[int]
    file_size: int


def _check_direct_map(image: Image) -> None:
    """Every region must have a direct-map address: a virtual address has 64 bits."""
    for index, region in enumerate(image.state.memory):
        if region.guest_phys_addr + region.size > DIRECT_MAP_SIZE:
            raise ImageError(f"memory region {index} at guest physical "
                             f"{region.guest_phys_addr:#x}+{region.size:#x} ends beyond "
                             f"{DIRECT_MAP_SIZE:#x}, the most an ELF core's direct map at "
                             f"{DIRECT_MAP_BASE:#x} can show", image.path)


def plan_core(image: Image) -> CoreLayout:
    state = image.state
    _check_direct_map(image)
    process = find_process(image)
    notes = _notes(image, process)
    mappings = _split_at_files(guest_mappings(image, image.read_phys), process.files)
    phnum = 1 + len(mappings) + len(state.memory)
    if phnum > elf.MAX_PHNUM:
        raise VmstateError(f"the guest's page tables have {len(mappings)} separate mappings, "
                           f"more than an ELF core can describe")
    notes_offset = elf.EHDR.size + elf.PHDR.size * phnum
    offset = (notes_offset + len(notes) + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    region_offsets = []
    for region in state.memory:
        region_offsets.append(offset)
        offset += (region.size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def file_offset(physical: int) -> int:
        for region, base in zip(state.memory, region_offsets):
            if region.guest_phys_addr <= physical < region.guest_phys_addr + region.size:
                return base + physical - region.guest_phys_addr
        raise ValueError(physical)

    segments = [Segment(m.virtual, m.physical, file_offset(m.physical), m.size, _flags(m))
                for m in mappings]
    segments += [Segment(DIRECT_MAP_BASE + r.guest_phys_addr, r.guest_phys_addr, base, r.size,
                         elf.PF_R | elf.PF_W)
                 for r, base in zip(state.memory, region_offsets)]
    ident = elf.ELF_MAGIC + bytes([elf.ELFCLASS64, elf.ELFDATA2LSB, elf.EV_CURRENT,
                                   elf.ELFOSABI_SYSV]) + bytes(8)
    header = elf.EHDR.pack(ident, elf.ET_CORE, elf.EM_X86_64, elf.EV_CURRENT, 0, elf.EHDR.size,
                           0, 0, elf.EHDR.size, elf.PHDR.size, phnum, 0, 0, 0)
    header += elf.PHDR.pack(elf.PT_NOTE, elf.PF_R, notes_offset, 0, 0, len(notes), 0, 4)
    header += b"".join(elf.PHDR.pack(elf.PT_LOAD, seg.flags, seg.offset, seg.vaddr, seg.paddr,
                                     seg.size, seg.size, PAGE_SIZE) for seg in segments)
    return CoreLayout(header + notes, segments, region_offsets, offset)


def write_core(path: str, image: Image, before_commit: Callable[[], object]) -> CoreLayout:
    """Split's software half: the core, written atomically (a derived output: not fsynced,
    see vmstate.atomic), memory straight from the image.
    `before_commit` runs once the bytes are written; if it raises, the core is discarded."""
    layout = plan_core(image)
    memory = [RegionMemory(offset, image.region_view(index), region.present)
              for index, (region, offset) in enumerate(zip(image.state.memory,
                                                           layout.region_offsets))]
    total = sum(m.present_bytes for m in memory)
    try:
        with atomic_output(path, durable=False) as f:
            with progress_bar(f"writing {path}", total) as advance:
                f.truncate(layout.file_size)
                pwrite_all(f.fileno(), layout.header, 0)
                write_runs(f.fileno(), memory, advance)
            before_commit()
    except OSError as e:
        raise VmstateError(f"cannot write {path}: {e.strerror}") from None
    return layout


# -- reading (join) ------------------------------------------------------------------------------

class Core(FdOwner):
    """A vmstate core file opened for join: its segments, and the source image's metadata."""

    def __init__(self, path: str):
        self.path = path
        self.fd = open_to_read(path, "core file", CoreError)
        try:
            self.file_size = os.fstat(self.fd).st_size
            self.segments, note_data = self._read_headers()
            self.source = self._source_image(note_data)
        except BaseException:
            os.close(self.fd)
            raise

    def _error(self, message: str, offset: int) -> CoreError:
        return CoreError(message, f"{self.path}: offset {offset:#x}")

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        """Bytes the header says are there; an offset or length past the file (up to 2^64,
        beyond what pread takes) is a truncated core."""
        data = os.pread(self.fd, length, offset) if offset + length <= self.file_size else b""
        if len(data) != length:
            raise self._error(f"{what} runs past the end of the file ({self.file_size} bytes): "
                              "truncated core", offset)
        return data

    def _read_headers(self) -> tuple[list[Segment], bytes]:
        ident = self._pread(0, elf.EHDR.size, "ELF header")
        (e_ident, e_type, e_machine, _, _, phoff, _, _, _, phentsize, phnum, _, _, _) = \
            elf.EHDR.unpack(ident)
        if e_ident[:4] != elf.ELF_MAGIC:
            raise self._error("not an ELF file", 0)
        if e_ident[4] != elf.ELFCLASS64 or e_ident[5] != elf.ELFDATA2LSB \
                or e_type != elf.ET_CORE or e_machine != elf.EM_X86_64:
            raise self._error("not an x86-64 ELF core file", 0)
        if phentsize != elf.PHDR.size:
            raise self._error(f"program header size {phentsize}, expected {elf.PHDR.size}", 54)
        table = self._pread(phoff, phnum * elf.PHDR.size, "program header table")
        segments, note_data = [], None
        for i in range(phnum):
            p_type, flags, offset, vaddr, paddr, filesz, memsz, _ = \
                elf.PHDR.unpack_from(table, i * elf.PHDR.size)
            where = phoff + i * elf.PHDR.size
            if offset + filesz > self.file_size:
                raise self._error(f"segment {i} ({filesz} bytes at {offset:#x}) runs past the end "
                                  f"of the file ({self.file_size} bytes): truncated core", where)
            if p_type == elf.PT_NOTE and note_data is None:
                note_data = self._pread(offset, filesz, "note segment")
            elif p_type == elf.PT_LOAD:
                if memsz != filesz:
                    raise self._error(f"segment {i} has {memsz - filesz} bytes not in the file "
                                      "(p_memsz > p_filesz): not a vmstate core", where)
                segments.append(Segment(vaddr, paddr, offset, filesz, flags))
        if note_data is None:
            raise self._error("no note segment: not a vmstate core", phoff)
        return segments, note_data

    def _source_image(self, note_data: bytes) -> ImageMetadata:
        try:
            notes = list(elf.iter_notes(note_data))
        except ValueError as e:
            raise self._error(f"broken note segment: {e}", 0) from None
        for name, kind, desc in notes:
            if name == NOTE_NAME and kind == NT_VMSTATE_IMAGE:
                if len(desc) < IMAGE_NOTE.size:
                    raise self._error("the VMSTATE note is too short", 0)
                version, _ = IMAGE_NOTE.unpack_from(desc)
                if version != IMAGE_NOTE_VERSION:
                    raise self._error(f"VMSTATE note version {version} is not supported "
                                      f"(reads {IMAGE_NOTE_VERSION})", 0)
                metadata = desc[IMAGE_NOTE.size:]
                return ImageMetadata(f"{self.path} (VMSTATE note)",
                                     lambda offset, length: metadata[offset:offset + length],
                                     None)
        raise self._error("no VMSTATE note: not a core written by vmstate split", 0)
