"""Encoding and decoding of section payloads: plain state <-> bytes, using the layouts in
layout.py. Decoders raise ValueError with a short reason; the reader adds file and offset."""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import astuple, fields

from ..chunks import CHUNK_PAGES, chunk_count
from ..pages import PageSet

from ..state import (
    CONTROL_REGISTERS, GP_REGISTERS, SEGMENT_FIELDS, SEGMENT_REGISTERS, AddressSpace, CpuidEntry,
    DebugRegisters, DescriptorTable, GuestLimits, MemoryRegion, OpenFile, PendingCall, Registers,
    Segment, SpecialRegisters, VcpuEvents, VcpuState, VmmState)
from . import layout as L


class PayloadReader:
    """Sequential reads from one payload; running past its end is a ValueError."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, st):
        if self.pos + st.size > len(self.data):
            raise ValueError(f"payload ends at byte {len(self.data)}, needs {self.pos + st.size}")
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def take_bytes(self, length: int) -> bytes:
        if self.pos + length > len(self.data):
            raise ValueError(f"payload ends at byte {len(self.data)}, needs {self.pos + length}")
        chunk = self.data[self.pos:self.pos + length]
        self.pos = L.align(self.pos + length)
        return chunk

    def end(self) -> None:
        if self.pos > len(self.data):
            raise ValueError(f"payload ends at byte {len(self.data)}, its last string needs "
                             f"padding to {self.pos}")
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} unexpected bytes after the payload")


def _string(data: bytes) -> bytes:
    return L.STRING.pack(len(data)) + data.ljust(L.align(len(data)), b"\0")


# -- vCPU -----------------------------------------------------------------------------------------

def encode_regs(regs: Registers) -> bytes:
    return L.REGS.pack(*(getattr(regs, name) for name in GP_REGISTERS))


def decode_regs(data: bytes) -> Registers:
    r = PayloadReader(data)
    regs = Registers(*r.take(L.REGS))
    r.end()
    return regs


def _encode_segment(seg: Segment) -> bytes:
    return L.SEGMENT.pack(seg.base, seg.limit, seg.selector, seg.type, seg.present, seg.dpl,
                          seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable)


def _decode_segment(values) -> Segment:
    base, limit, selector, *flags = values
    return Segment(selector, base, limit, *flags)


def encode_sregs(s: SpecialRegisters) -> bytes:
    return (b"".join(_encode_segment(getattr(s, name)) for name in SEGMENT_REGISTERS)
            + L.DTABLE.pack(s.gdt.base, s.gdt.limit) + L.DTABLE.pack(s.idt.base, s.idt.limit)
            + L.SREGS_TAIL.pack(*(getattr(s, name) for name in CONTROL_REGISTERS),
                                *s.interrupt_bitmap))


def decode_sregs(data: bytes) -> SpecialRegisters:
    r = PayloadReader(data)
    segments = {name: _decode_segment(r.take(L.SEGMENT)) for name in SEGMENT_REGISTERS}
    gdt, idt = DescriptorTable(*r.take(L.DTABLE)), DescriptorTable(*r.take(L.DTABLE))
    tail = r.take(L.SREGS_TAIL)
    r.end()
    controls = dict(zip(CONTROL_REGISTERS, tail[:7]))
    return SpecialRegisters(**segments, gdt=gdt, idt=idt, **controls,
                            interrupt_bitmap=tuple(tail[7:]))


def _encode_pairs(pairs, entry) -> bytes:
    return L.COUNT.pack(len(pairs)) + b"".join(entry.pack(a, b) for a, b in pairs)


def _decode_pairs(data: bytes, entry) -> tuple[tuple[int, int], ...]:
    r = PayloadReader(data)
    (count,) = r.take(L.COUNT)
    pairs = tuple(r.take(entry) for _ in range(count))
    r.end()
    return pairs


def encode_events(e: VcpuEvents) -> bytes:
    (exc_inj, exc_nr, exc_has_err, exc_pending, exc_err, int_inj, int_nr, int_soft, int_shadow,
     nmi_inj, nmi_pending, nmi_masked, sipi, flags, smm, smi_pending, smi_nmi, smi_init,
     triple, has_payload, payload) = astuple(e)
    return L.EVENTS.pack(exc_inj, exc_nr, exc_has_err, exc_pending, exc_err, int_inj, int_nr,
                         int_soft, int_shadow, nmi_inj, nmi_pending, nmi_masked, 0, sipi, flags,
                         smm, smi_pending, smi_nmi, smi_init, triple, has_payload, payload)


def decode_events(data: bytes) -> VcpuEvents:
    r = PayloadReader(data)
    values = list(r.take(L.EVENTS))
    r.end()
    del values[12]          # the nmi pad byte
    return VcpuEvents(*values)


def encode_cpuid(entries: tuple[CpuidEntry, ...]) -> bytes:
    return L.COUNT.pack(len(entries)) + b"".join(L.CPUID_ENTRY.pack(*astuple(e)) for e in entries)


def decode_cpuid(data: bytes) -> tuple[CpuidEntry, ...]:
    r = PayloadReader(data)
    (count,) = r.take(L.COUNT)
    entries = tuple(CpuidEntry(*r.take(L.CPUID_ENTRY)) for _ in range(count))
    r.end()
    return entries


def _single(st, data: bytes):
    r = PayloadReader(data)
    values = r.take(st)
    r.end()
    return values


def encode_vcpu(v: VcpuState) -> list[tuple[int, bytes]]:
    """(section type, payload) for each part of one vCPU, in canonical order."""
    return [
        (L.VCPU_REGS, encode_regs(v.regs)),
        (L.VCPU_SREGS, encode_sregs(v.sregs)),
        (L.VCPU_MSRS, _encode_pairs(v.msrs, L.MSR_ENTRY)),
        (L.VCPU_XSAVE, v.xsave),
        (L.VCPU_XCRS, _encode_pairs(v.xcrs, L.XCR_ENTRY)),
        (L.VCPU_EVENTS, encode_events(v.events)),
        (L.VCPU_MP_STATE, L.MP_STATE.pack(v.mp_state)),
        (L.VCPU_DEBUGREGS, L.DEBUGREGS.pack(*astuple(v.debugregs))),
        (L.VCPU_CPUID, encode_cpuid(v.cpuid)),
    ]


VCPU_DECODERS = {
    L.VCPU_REGS: ("regs", decode_regs),
    L.VCPU_SREGS: ("sregs", decode_sregs),
    L.VCPU_MSRS: ("msrs", lambda d: _decode_pairs(d, L.MSR_ENTRY)),
    L.VCPU_XSAVE: ("xsave", bytes),
    L.VCPU_XCRS: ("xcrs", lambda d: _decode_pairs(d, L.XCR_ENTRY)),
    L.VCPU_EVENTS: ("events", decode_events),
    L.VCPU_MP_STATE: ("mp_state", lambda d: _single(L.MP_STATE, d)[0]),
    L.VCPU_DEBUGREGS: ("debugregs", lambda d: DebugRegisters(*_single(L.DEBUGREGS, d))),
    L.VCPU_CPUID: ("cpuid", decode_cpuid),
}
REQUIRED_VCPU_SECTIONS = (L.VCPU_REGS, L.VCPU_SREGS)


# -- memory regions ------------------------------------------------------------------------------

def encode_region(region: MemoryRegion, data_offset: int, hashes: array) -> bytes:
    """The memory-region payload: the region, its present-page bitmap, its chunk checksums."""
    if region.present.page_count != region.page_count:
        raise ValueError(f"a present-page set of {region.present.page_count} pages for a "
                         f"region of {region.page_count}")
    bitmap = region.present.bits
    return (L.REGION.pack(region.guest_phys_addr, region.size, data_offset, CHUNK_PAGES)
            + bitmap.ljust(L.align(len(bitmap)), b"\0") + hashes.tobytes())


def region_payload_size(size: int) -> int:
    pages = size // L.PAGE
    return L.REGION.size + L.align((pages + 7) // 8) + L.CHUNK_HASH.size * chunk_count(pages)


def decode_region(data: bytes) -> tuple[MemoryRegion, int, array]:
    """(region, data_offset, chunk checksums); ValueError names what is wrong."""
    r = PayloadReader(data)
    gpa, size, data_offset, chunk_pages = r.take(L.REGION)
    if not size:
        raise ValueError("memory region of size 0")
    if gpa % L.PAGE or size % L.PAGE or data_offset % L.PAGE:
        raise ValueError(f"region {gpa:#x}+{size:#x} at file offset {data_offset:#x} is not "
                         "page aligned")
    if chunk_pages != CHUNK_PAGES:
        raise ValueError(f"chunk size of {chunk_pages} pages (this format uses {CHUNK_PAGES})")
    if len(data) != region_payload_size(size):
        raise ValueError(f"payload of {len(data)} bytes, a region of {size:#x} bytes needs "
                         f"{region_payload_size(size)}")
    pages = size // L.PAGE
    bitmap = r.take_bytes((pages + 7) // 8)
    if pages % 8 and bitmap[-1] >> pages % 8:
        raise ValueError(f"the present bitmap marks pages past the region's {pages} pages")
    hashes = array("Q", r.take_bytes(L.CHUNK_HASH.size * chunk_count(pages)))
    r.end()
    return MemoryRegion(gpa, size, PageSet(bitmap, pages)), data_offset, hashes


# -- VMM state --------------------------------------------------------------------------------

def encode_program(vmm: VmmState) -> bytes:
    parts = [_string(os.fsencode(vmm.program)), L.COUNT.pack(len(vmm.argv))]
    parts += [_string(os.fsencode(arg)) for arg in vmm.argv]
    return b"".join(parts)


def decode_program(data: bytes) -> tuple[str, tuple[str, ...]]:
    r = PayloadReader(data)
    program = os.fsdecode(r.take_bytes(r.take(L.STRING)[0]))
    (count,) = r.take(L.COUNT)
    argv = tuple(os.fsdecode(r.take_bytes(r.take(L.STRING)[0])) for _ in range(count))
    r.end()
    return program, argv


def encode_files(files: tuple[OpenFile, ...]) -> bytes:
    parts = [L.COUNT.pack(len(files))]
    for f in files:
        path = os.fsencode(f.path)
        parts.append(L.FILE_ENTRY.pack(f.fd, L.FILE_KINDS.index(f.kind), f.flags, f.mode,
                                       f.offset, len(path)))
        parts.append(path.ljust(L.align(len(path)), b"\0"))
    return b"".join(parts)


def decode_files(data: bytes) -> tuple[OpenFile, ...]:
    r = PayloadReader(data)
    (count,) = r.take(L.COUNT)
    files = []
    for _ in range(count):
        fd, kind, flags, mode, offset, path_length = r.take(L.FILE_ENTRY)
        if kind >= len(L.FILE_KINDS):
            raise ValueError(f"file table entry for fd {fd} has unknown kind {kind}")
        path = os.fsdecode(r.take_bytes(path_length))
        files.append(OpenFile(fd, L.FILE_KINDS[kind], path, flags, mode, offset))
    r.end()
    return tuple(files)


def encode_address_space(a: AddressSpace) -> bytes:
    return (L.ADDRESS_SPACE.pack(a.user_start, a.user_end, a.brk_start, a.brk, a.mmap_low,
                                 a.mmap_top, len(a.free_ranges))
            + b"".join(L.FREE_RANGE.pack(*r) for r in a.free_ranges))


def decode_address_space(data: bytes) -> AddressSpace:
    r = PayloadReader(data)
    *values, free_count = r.take(L.ADDRESS_SPACE)
    free = tuple(r.take(L.FREE_RANGE) for _ in range(free_count))
    r.end()
    return AddressSpace(*values, free_ranges=free)


def encode_pending(p: PendingCall) -> bytes:
    return L.PENDING_CALL.pack(p.nr, *p.args, p.rip)


def decode_pending(data: bytes) -> PendingCall:
    nr, *rest = _single(L.PENDING_CALL, data)
    return PendingCall(nr, tuple(rest[:6]), rest[6])


def encode_vmm(vmm: VmmState) -> list[tuple[int, bytes]]:
    sections = [(L.VMM_PROGRAM, encode_program(vmm)), (L.VMM_FILES, encode_files(vmm.files)),
                (L.VMM_ADDRESS_SPACE, encode_address_space(vmm.address_space))]
    if vmm.pending is not None:
        sections.append((L.VMM_PENDING_CALL, encode_pending(vmm.pending)))
    if vmm.os is not None:
        from .os_codec import encode_os
        sections.append((L.VMM_OS, encode_os(vmm.os)))
    if vmm.saved_by:
        sections.append((L.VMM_SAVED_BY, encode_saved_by(vmm.saved_by)))
    if vmm.limits is not None:
        sections.append((L.VMM_LIMITS, encode_limits(vmm.limits)))
    if vmm.sleep_left_ns is not None:
        sections.append((L.VMM_SLEEP_LEFT, L.SLEEP_LEFT.pack(vmm.sleep_left_ns)))
    return sections


def decode_sleep_left(data: bytes) -> int:
    return _single(L.SLEEP_LEFT, data)[0]


def encode_limits(limits: GuestLimits) -> bytes:
    size = L.NO_FILE_SIZE_CAP if limits.max_file_size is None else limits.max_file_size
    return L.LIMITS.pack(size, limits.max_fds, limits.max_processes)


def decode_limits(data: bytes) -> GuestLimits:
    size, max_fds, max_processes = _single(L.LIMITS, data)
    return GuestLimits(None if size == L.NO_FILE_SIZE_CAP else size, max_fds, max_processes)


def encode_saved_by(cpu: str) -> bytes:
    return _string(cpu.encode())


def decode_saved_by(data: bytes) -> str:
    """Printable ASCII only: the value is shown by info and carried by the XML, which can
    hold neither control characters nor arbitrary bytes."""
    r = PayloadReader(data)
    text = r.take_bytes(r.take(L.STRING)[0])
    r.end()
    bad = next((i for i, byte in enumerate(text) if not 0x20 <= byte <= 0x7E), None)
    if bad is not None:
        raise ValueError(f"saved-by byte {bad} is {text[bad]:#04x}, not printable ASCII")
    return text.decode("ascii")


assert [f.name for f in fields(Segment)] == list(SEGMENT_FIELDS)
assert sys.byteorder == "little"        # chunk checksums are stored as native u64 arrays
