"""The ELF core of a split QEMU stream (schemas/qemu-core.md): every RAM block's bytes once,
as its own PT_LOAD(s), plus the vCPUs' notes, so gdb and crash-dump tools read it.

    ELF header | block 0 | block 1 | ... | program headers | notes   (blocks page aligned)

The headers come last because they are known last: split writes each page where it belongs
as the stream is read, and only then reads the device sections and the page tables that the
notes and the virtual mappings need.

- PT_LOAD per guest-physical placement of a block (system RAM, the BIOS): p_paddr the guest
  physical address, p_vaddr the same while paging is off; blocks with no guest physical
  address (ROMs, fw_cfg blobs) at p_paddr 0 and a p_vaddr above UNPLACED_BASE (never a guest
  virtual address). With long-mode paging on, one more PT_LOAD per run of the page tables'
  virtual mappings, pointing into the same bytes.
- PT_NOTE: per vCPU NT_PRSTATUS ("CORE") and QEMU's "QEMU" CPU-state note (as
  dump-guest-memory writes them), and a "VMSTATE-QEMU" note: the stream digest and each
  block's name, size and file offset, which join reads.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from .. import elf, x86
from ..errors import FormatError, VmstateError
from ..fd import allocate, open_to_read, pwrite_all
from ..paging import Mapping, PageTables, clip
from . import cpu, layout
from .description import encode_group
from .machine import placements
from .stream import PageRun, QemuStream, RamBlock
from .streamwrite import BlockMemory

EM_386 = 3
UNPLACED_BASE = 0x8000_0000_0000_0000     # up to CANONICAL_HIGH: no guest virtual address
CANONICAL_HIGH = 0xFFFF_8000_0000_0000
NOTE_NAME = b"VMSTATE-QEMU"
NT_VMSTATE_QEMU = 0x564D5351             # "VMSQ"
# version, reserved, stream digest, machine type length, block count, device section count;
# then the machine type, each block (file offset, size, name length, name), and each device
# section as the stream had it (section id, body length, body): join's baseline for its summary.
BLOCK_NOTE_HEADER = struct.Struct("<IIQHII")
BLOCK_ENTRY = struct.Struct("<QQH")
DEVICE_ENTRY = struct.Struct("<II")
BLOCK_NOTE_VERSION = 1
QEMU_NOTE_NAME = b"QEMU"
# QEMUCPUState (version 1): version, size, 16 GP registers (rax rbx rcx rdx rsi rdi rsp rbp
# r8..r15), rip, rflags, 10 segments (cs ds es fs gs ss ldt tr gdt idt) as {u32 selector,
# limit, flags, pad; u64 base}, cr[5], kernel_gs_base.
QEMU_SEGMENT = struct.Struct("<IIIIQ")
QEMU_CPU_STATE = struct.Struct("<II18Q240s5QQ")
QEMU_CPU_GP = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
               "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
QEMU_CPU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")


class QemuCoreError(FormatError):
    pass


@dataclass(frozen=True)
class CoreBlock:
    name: str
    size: int
    offset: int


@dataclass(frozen=True)
class CorePlan:
    header: bytes                 # the ELF header, at 0
    tail: bytes                   # program headers and notes, at tail_offset (after the blocks)
    tail_offset: int
    segments: int


FILL_PAGES = 256                      # pages of a non-zero fill written per call
ALLOCATE_MIN = 64 << 10               # smaller stretches are written without fallocate first
BLOCKS_OFFSET = layout.PAGE_SIZE      # the first block's offset: the ELF header's page


def block_offsets(blocks: list[RamBlock]) -> list[int]:
    """Each block's file offset: back to back from BLOCKS_OFFSET, page aligned."""
    offsets, offset = [], BLOCKS_OFFSET
    for block in blocks:
        offsets.append(offset)
        offset += _page_up(block.size)
    return offsets


# i386 struct elf_prstatus (for EM_386 cores, as gdb reads them): siginfo, cursig, sigpend,
# sighold, pid, ppid, pgrp, sid, four timevals, 17 registers, fpvalid.
PRSTATUS_I386 = struct.Struct("<iiih2xIIiiii32x17Ii")
PRSTATUS_I386_REGISTERS = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax", "ds", "es", "fs",
                           "gs", "orig_rax", "rip", "cs", "rflags", "rsp", "ss")
assert PRSTATUS_I386.size == 144


def _prstatus_i386(view: cpu.VcpuView) -> bytes:
    v = view.values
    values = {**{name: v["registers", name, "value"] & 0xFFFFFFFF for name in cpu.REGISTER_NAMES},
              **{name: v["segment", name, "selector"] for name in cpu.SEGMENT_ORDER},
              "orig_rax": 0xFFFFFFFF}
    pid = 1 + view.id
    return PRSTATUS_I386.pack(0, 0, 0, 0, 0, 0, pid, 0, pid, pid,
                              *(values[name] for name in PRSTATUS_I386_REGISTERS), 0)


def _prstatus(view: cpu.VcpuView) -> bytes:
    v = view.values
    reg = {name: v["registers", name, "value"] for name in cpu.REGISTER_NAMES}
    seg = {name: v["segment", name, "selector"] for name in cpu.SEGMENT_ORDER}
    values = {**reg, "orig_rax": (1 << 64) - 1, "eflags": reg["rflags"],
              "fs_base": v["segment", "fs", "base"], "gs_base": v["segment", "gs", "base"], **seg}
    pid = 1 + view.id
    return elf.PRSTATUS.pack(0, 0, 0, 0, 0, 0, pid, 0, pid, pid,
                             *(values[name] for name in elf.PRSTATUS_REGISTERS), 0)


def _qemu_cpu_state(view: cpu.VcpuView) -> bytes:
    v = view.values
    segments = []
    for name in QEMU_CPU_SEGMENTS:
        if name in cpu.TABLE_NAMES:
            segments.append(QEMU_SEGMENT.pack(0, v["table", name, "limit"], 0, 0,
                                              v["table", name, "base"]))
        else:
            segments.append(QEMU_SEGMENT.pack(v["segment", name, "selector"],
                                              v["segment", name, "limit"],
                                              v["segment", name, "flags"], 0,
                                              v["segment", name, "base"]))
    crs = [v["control", f"cr{n}", "value"] if n != 1 else 0 for n in range(5)]
    gp = [v["registers", name, "value"] for name in QEMU_CPU_GP]
    return QEMU_CPU_STATE.pack(1, QEMU_CPU_STATE.size, *gp, v["registers", "rip", "value"],
                               v["registers", "rflags", "value"], b"".join(segments), *crs, 0)


def _block_note(stream: QemuStream, digest: int, blocks: list[CoreBlock]) -> bytes:
    machine = stream.machine.encode("latin-1")
    devices = stream.device_sections()
    parts = [BLOCK_NOTE_HEADER.pack(BLOCK_NOTE_VERSION, 0, digest, len(machine), len(blocks),
                                    len(devices)), machine]
    for block in blocks:
        name = block.name.encode("utf-8")
        parts.append(BLOCK_ENTRY.pack(block.offset, block.size, len(name)) + name)
    for section in devices:
        body: list[bytes] = []
        encode_group(section.device, body)
        data = b"".join(body)
        parts.append(DEVICE_ENTRY.pack(section.section_id, len(data)) + data)
    return b"".join(parts)


def long_mode(view: cpu.VcpuView) -> bool:
    return bool(view.values["control", "efer", "value"] & x86.EFER_LMA)


def plan_core(stream: QemuStream, views: list[cpu.VcpuView], digest: int,
              mappings: list[Mapping]) -> CorePlan:
    """The ELF header, program headers and notes (mappings: virtual runs for long mode)."""
    placed, unplaced_at = [], UNPLACED_BASE
    blocks = [CoreBlock(block.name, block.size, offset)
              for block, offset in zip(stream.blocks, block_offsets(stream.blocks))]
    for block, core_block in zip(stream.blocks, blocks):
        parts = placements(stream.machine, block)
        if parts:
            for part in parts:
                placed.append((core_block.offset + part.offset, part.address, part.address,
                               part.length))
        else:
            placed.append((core_block.offset, unplaced_at, 0, block.size))
            unplaced_at += _page_up(block.size)
    for m in mappings:
        file_offset = _physical_offset(stream, blocks, m.physical)
        if file_offset is not None:
            placed.append((file_offset, m.virtual, m.physical, m.size))
    phnum = 1 + len(placed)
    if phnum > elf.MAX_PHNUM:
        raise VmstateError(f"the guest's page tables have {len(mappings)} separate mappings, "
                           "more than an ELF core can describe")
    machine = elf.EM_X86_64 if views and long_mode(views[0]) else EM_386
    prstatus = _prstatus if machine == elf.EM_X86_64 else _prstatus_i386
    notes = b"".join(
        [elf.note(b"CORE", elf.NT_PRSTATUS, prstatus(view)) for view in views]
        + [elf.note(QEMU_NOTE_NAME, 0, _qemu_cpu_state(view)) for view in views]
        + [elf.note(NOTE_NAME, NT_VMSTATE_QEMU, _block_note(stream, digest, blocks))])
    tail_offset = blocks[-1].offset + _page_up(blocks[-1].size) if blocks else BLOCKS_OFFSET
    notes_offset = tail_offset + elf.PHDR.size * phnum
    ident = elf.ELF_MAGIC + bytes([elf.ELFCLASS64, elf.ELFDATA2LSB, elf.EV_CURRENT,
                                   elf.ELFOSABI_SYSV]) + bytes(8)
    header = elf.EHDR.pack(ident, elf.ET_CORE, machine, elf.EV_CURRENT, 0, tail_offset, 0, 0,
                           elf.EHDR.size, elf.PHDR.size, phnum, 0, 0, 0)
    tail = elf.PHDR.pack(elf.PT_NOTE, 0, notes_offset, 0, 0, len(notes), len(notes), 0)
    rwx = elf.PF_R | elf.PF_W | elf.PF_X
    tail += b"".join(elf.PHDR.pack(elf.PT_LOAD, rwx, file_offset, vaddr, paddr, size, size, 0)
                     for file_offset, vaddr, paddr, size in placed)
    return CorePlan(header, tail + notes, tail_offset, len(placed))


def _page_up(n: int) -> int:
    return (n + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE


def _physical_offset(stream: QemuStream, blocks: list[CoreBlock], physical: int) -> int | None:
    for block, core_block in zip(stream.blocks, blocks):
        for part in placements(stream.machine, block):
            if part.address <= physical < part.address + part.length:
                return core_block.offset + part.offset + physical - part.address
    return None


def guest_mappings(stream: QemuStream, view: cpu.VcpuView, read_phys) -> list[Mapping]:
    """The first vCPU's virtual mappings in long mode, clipped to placed memory; none when
    paging is off (then p_vaddr = p_paddr already gives gdb the addresses) or not walkable."""
    v = view.values
    cr0, cr3, cr4, efer = (v["control", n, "value"] for n in ("cr0", "cr3", "cr4", "efer"))
    if not cr0 & x86.CR0_PG or not efer & x86.EFER_LMA:
        return []
    try:
        mappings = list(PageTables(read_phys, cr3, cr0, cr4, efer).mappings())
    except VmstateError:
        return []
    pieces = (clip(m, part.address, part.length) for block in stream.blocks
              for part in placements(stream.machine, block) for m in mappings)
    return [piece for piece in pieces if piece is not None]


# -- writing (split) -------------------------------------------------------------------------

class CorePages:
    """Puts pages in their places in the core `path` (open as `fd`) as the stream is read
    (`write` is the stream reader's page sink, `write_fill` its fills); ZERO pages stay
    holes, but for a fill other than 0. Stretches of ALLOCATE_MIN bytes or more get their
    blocks allocated before they are written. A failed write is a VmstateError naming the
    core."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path
        self._offsets: list[int] | None = None

    def write(self, blocks: list[RamBlock], run: PageRun, index: int, payloads,
              count: int) -> None:
        offset = self._block_offset(blocks, run.block) + \
            (run.first_page + index) * layout.PAGE_SIZE
        with memoryview(payloads) as view, view[:count * layout.PAGE_SIZE] as pages:
            self._write(pages, offset)

    def write_fill(self, blocks: list[RamBlock], run: PageRun) -> None:
        """The pages of a run of ZERO records whose fill is not 0."""
        start = self._block_offset(blocks, run.block) + run.first_page * layout.PAGE_SIZE
        step = min(run.count, FILL_PAGES)
        pages = bytes([run.fill]) * (step * layout.PAGE_SIZE)
        for first in range(0, run.count, step):
            n = min(step, run.count - first)
            self._write(pages[:n * layout.PAGE_SIZE], start + first * layout.PAGE_SIZE)

    def _block_offset(self, blocks: list[RamBlock], block: int) -> int:
        if self._offsets is None:           # the blocks are known before any page is read
            self._offsets = block_offsets(blocks)
        return self._offsets[block]

    def _write(self, data, offset: int) -> None:
        try:
            if len(data) >= ALLOCATE_MIN:
                allocate(self.fd, offset, len(data))
            pwrite_all(self.fd, data, offset)
        except OSError as e:
            raise VmstateError(f"cannot write {self.path}: {e.strerror}") from None

    def write_headers(self, plan: CorePlan) -> None:
        self._write(plan.header, 0)
        self._write(plan.tail, plan.tail_offset)


# -- reading (join) --------------------------------------------------------------------------

class QemuCore:
    """A core written by split from a QEMU stream: open as `fd` (for bulk reads of its
    blocks) and mapped read-only as `data` (for its headers and small reads)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = open_to_read(path, "core file", QemuCoreError)
        try:
            size = os.fstat(self.fd).st_size
            if size < elf.EHDR.size:
                raise self._error("too short for an ELF header: not a core", 0)
            self.data = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            try:
                self.digest, self.blocks = self._read()
            except BaseException:
                self.data.close()
                raise
        except BaseException:
            os.close(self.fd)
            raise

    def _error(self, message: str, offset: int) -> QemuCoreError:
        return QemuCoreError(message, f"{self.path}: offset {offset:#x}")

    def _read(self):
        fields = elf.EHDR.unpack_from(self.data, 0)
        ident, phoff, phnum = fields[0], fields[5], fields[10]
        if ident[:4] != elf.ELF_MAGIC or ident[4] != elf.ELFCLASS64 or fields[1] != elf.ET_CORE:
            raise self._error("not an ELF64 core file", 0)
        if phoff + phnum * elf.PHDR.size > len(self.data):
            raise self._error("program headers run past the end of the file: truncated core",
                              phoff)
        self.loads = []                       # (p_vaddr, p_paddr, size) of guest-visible PT_LOADs
        note = None
        for i in range(phnum):
            p_type, _, offset, vaddr, paddr, filesz, _, _ = \
                elf.PHDR.unpack_from(self.data, phoff + i * elf.PHDR.size)
            if p_type == elf.PT_LOAD and not UNPLACED_BASE <= vaddr < CANONICAL_HIGH:
                self.loads.append((vaddr, paddr, filesz))
            if p_type != elf.PT_NOTE or note is not None:
                continue
            if offset + filesz > len(self.data):
                raise self._error("the note segment runs past the end of the file", offset)
            try:
                notes = list(elf.iter_notes(self.data[offset:offset + filesz]))
            except ValueError as e:
                raise self._error(f"broken note segment: {e}", offset) from None
            for name, kind, desc in notes:
                if name == NOTE_NAME and kind == NT_VMSTATE_QEMU:
                    note = (desc, offset)
        if note is None:
            raise self._error("no VMSTATE-QEMU note: not a core split from a QEMU stream", 0)
        return self._note(*note)

    def virtual_addresses(self, physical: int) -> list[int]:
        """Every p_vaddr through which the core shows guest physical address `physical`."""
        return sorted({vaddr + physical - paddr for vaddr, paddr, size in self.loads
                       if paddr <= physical < paddr + size})

    def _note(self, desc: bytes, where: int):
        """Sets machine, devices (section id -> original body); returns (digest, blocks)."""
        try:
            version, _, digest, machine_length, count, device_count = \
                BLOCK_NOTE_HEADER.unpack_from(desc)
            if version != BLOCK_NOTE_VERSION:
                raise self._error(f"VMSTATE-QEMU note version {version}, expected "
                                  f"{BLOCK_NOTE_VERSION}", where)
            position = BLOCK_NOTE_HEADER.size
            self.machine = desc[position:position + machine_length].decode("latin-1")
            position += machine_length
            blocks = {}
            for _ in range(count):
                offset, size, length = BLOCK_ENTRY.unpack_from(desc, position)
                position += BLOCK_ENTRY.size
                name = desc[position:position + length].decode("utf-8")
                position += length
                if offset + size > len(self.data):
                    raise self._error(f"block {name!r} runs past the end of the file: truncated "
                                      "core", offset)
                blocks[name] = CoreBlock(name, size, offset)
            self.devices = {}
            for _ in range(device_count):
                section_id, length = DEVICE_ENTRY.unpack_from(desc, position)
                position += DEVICE_ENTRY.size
                self.devices[section_id] = desc[position:position + length]
                position += length
            if position > len(desc):
                raise struct.error
        except (struct.error, UnicodeDecodeError):
            raise self._error("the VMSTATE-QEMU note is cut short", where) from None
        return digest, blocks

    def block_memory(self, name: str) -> BlockMemory:
        """The block's bytes; release its view before closing the core."""
        block = self.blocks[name]
        return BlockMemory(memoryview(self.data)[block.offset:block.offset + block.size],
                           self.fd, block.offset)

    def close(self) -> None:
        os.close(self.fd)
        try:
            self.data.close()
        except BufferError:     # views still borrow it (an error is on its way up): the
            pass                # mapping goes when they do

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
