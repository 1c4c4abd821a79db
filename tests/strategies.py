"""Hypothesis strategies for VM states and their memory (shared by the format tests)."""

from __future__ import annotations

import mmap
import random
from dataclasses import replace

from hypothesis import strategies as st

from vmstate.image import layout as L
from vmstate.pages import PageSet, runs_from_bytemap
from vmstate.state import (
    PAGE_SIZE, AddressSpace, CpuidEntry, DebugRegisters, Descriptor, DescriptorTable,
    ExtraSection, GuestLimits, GuestOs, MemoryRegion, OpenFile, PendingCall, Pipe, Registers, Segment,
    SignalAction, SpecialRegisters, VcpuEvents, VcpuState, VmmState, VmState)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
names = st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=12)
cpu_names = st.sampled_from(("", "kvm", "soft")) | st.text(           # vmm-saved-by: any
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)  # printable


def _fields(cls, **overrides):
    return st.builds(cls, **{name: overrides.get(name, u64)
                             for name in cls.__dataclass_fields__})


segments = st.builds(Segment, selector=u16, base=u64, limit=u32, type=u8, present=u8, dpl=u8,
                     db=u8, s=u8, l=u8, g=u8, avl=u8, unusable=u8)
sregs = st.builds(SpecialRegisters, cs=segments, ds=segments, es=segments, fs=segments,
                  gs=segments, ss=segments, tr=segments, ldt=segments,
                  gdt=st.builds(DescriptorTable, u64, u16),
                  idt=st.builds(DescriptorTable, u64, u16),
                  cr0=u64, cr2=u64, cr3=u64, cr4=u64, cr8=u64, efer=u64, apic_base=u64,
                  interrupt_bitmap=st.tuples(u64, u64, u64, u64))
events = st.builds(VcpuEvents, **{
    name: (u32 if name in ("exception_error_code", "sipi_vector", "flags")
           else u64 if name == "exception_payload" else u8)
    for name in VcpuEvents.__dataclass_fields__})


@st.composite
def vcpus(draw, vcpu_id: int) -> VcpuState:
    return VcpuState(
        id=vcpu_id, regs=draw(_fields(Registers)), sregs=draw(sregs),
        msrs=tuple(draw(st.lists(st.tuples(u32, u64), max_size=6, unique_by=lambda m: m[0]))),
        xsave=draw(st.just(b"") | st.integers(576 // 4, 640 // 4).flatmap(
            lambda words: st.binary(min_size=4 * words, max_size=4 * words))),
        xcrs=tuple(draw(st.lists(st.tuples(u32, u64), max_size=2, unique_by=lambda x: x[0]))),
        events=draw(events), mp_state=draw(u32),
        debugregs=draw(_fields(DebugRegisters)),
        cpuid=tuple(draw(st.lists(st.builds(CpuidEntry, u32, u32, u32, u32, u32, u32, u32),
                                  max_size=4))))


@st.composite
def regions(draw, index: int) -> tuple[MemoryRegion, bytes]:
    pages = draw(st.integers(1, 24))
    present = draw(st.lists(st.booleans(), min_size=pages, max_size=pages))
    runs, start = [], None
    for page, here in enumerate([*present, False]):
        if here and start is None:
            start = page
        elif not here and start is not None:
            runs.append((start, page - start))
            start = None
    contents = bytearray(pages * PAGE_SIZE)
    for first, count in runs:
        seed = draw(st.binary(min_size=1, max_size=16))
        contents[first * PAGE_SIZE:(first + count) * PAGE_SIZE] = \
            (seed * (count * PAGE_SIZE // len(seed) + 1))[:count * PAGE_SIZE]
    return MemoryRegion(index * (64 << 20), pages * PAGE_SIZE,
                        PageSet.from_runs(tuple(runs), pages)), bytes(contents)


open_files = st.builds(
    OpenFile, fd=st.integers(0, 1023), kind=st.sampled_from(L.FILE_KINDS),
    path=st.lists(names.filter(lambda n: n not in (".", "..")), min_size=1, max_size=3)
    .map("/".join), flags=u32, mode=st.integers(0, 0o777), offset=st.integers(0, (1 << 63) - 1))
@st.composite
def address_spaces(draw, memory_end: int) -> AddressSpace:
    """Ordered as the VMM keeps them, inside memory; freed ranges whole pages of the mmap
    area, sorted and disjoint."""
    points = sorted(draw(st.lists(st.integers(0, memory_end), min_size=6, max_size=6)))
    low, top = points[3] // PAGE_SIZE, points[4] // PAGE_SIZE
    pages = sorted(draw(st.sets(st.integers(low + 1, top), max_size=4))) if top > low else []
    free = tuple((first * PAGE_SIZE, (second - first) * PAGE_SIZE)
                 for first, second in zip(pages[::2], pages[1::2]) if second > first)
    user_start, brk_start, brk, mmap_low, mmap_top, user_end = points
    return AddressSpace(user_start=user_start, user_end=user_end, brk_start=brk_start, brk=brk,
                        mmap_low=mmap_low, mmap_top=mmap_top, free_ranges=free)
pending_calls = st.builds(PendingCall, u64 | st.sampled_from((35, 230)),
                          st.tuples(u64, u64, u64, u64, u64, u64), u64)
int31 = st.integers(0, (1 << 31) - 1)
guest_paths = st.just(".") | st.lists(names.filter(lambda n: n not in (".", "..")), min_size=1,
                                      max_size=3).map("/".join)
guest_os_states = st.builds(
    GuestOs, cwd=guest_paths, umask=st.integers(0, 0o777), hostname=names, uid=u32, gid=u32,
    descriptors=st.lists(st.builds(Descriptor, fd=st.integers(0, 1023), description=int31,
                                   cloexec=st.booleans(), pipe=st.just(-1) | int31, flags=u32),
                         max_size=4, unique_by=lambda d: d.fd).map(tuple),
    pipes=st.lists(st.builds(Pipe, int31, st.binary(max_size=40)), max_size=2,
                   unique_by=lambda p: p.id).map(tuple),
    actions=st.lists(st.builds(SignalAction, u32, u64, u64, u64, u64), max_size=3).map(tuple),
    blocked=u64, pending=u64, altstack=st.tuples(u64, u32, u64), alarm_ns=u64,
    alarm_interval_ns=u64, limits=st.lists(st.tuples(u32, u64, u64), max_size=2).map(tuple))
# fds in these states go up to validate's MAX_GUEST_FDS - 1: max_fds is that cap
guest_limits = st.builds(GuestLimits, max_file_size=st.none() | st.integers(0, 2**64 - 2),
                         max_fds=st.just(1 << 20), max_processes=st.integers(1, 1 << 15))
known_types = set(L.SECTION_NAMES)
extras = st.builds(ExtraSection, type=u16.filter(lambda t: t not in known_types),
                   instance=u32, flags=st.just(L.SECTION_OPTIONAL), data=st.binary(max_size=40))


@st.composite
def vm_states(draw) -> tuple[VmState, list[bytes]]:
    vcpu_list = tuple(draw(vcpus(i)) for i in range(draw(st.integers(1, 2))))
    region_pairs = [draw(regions(i)) for i in range(draw(st.integers(1, 2)))]
    vmm = VmmState(program=draw(names), argv=tuple(draw(st.lists(names, max_size=3))),
                   files=tuple(draw(st.lists(open_files, max_size=3, unique_by=lambda f: f.fd))),
                   address_space=draw(address_spaces(max(r.guest_phys_addr + r.size
                                                          for r, _ in region_pairs))),
                   pending=draw(st.none() | pending_calls),
                   saved_by=draw(cpu_names),
                   limits=draw(st.none() | guest_limits))
    if vmm.pending is not None and vmm.pending.nr in (35, 230):     # nanosleep, clock_nanosleep
        vmm = replace(vmm, sleep_left_ns=draw(st.none() | u64))
    guest_os = draw(st.none() | guest_os_states)
    if guest_os is not None:      # descriptors that agree with the file table (see validate)
        pipe_ids = [p.id for p in guest_os.pipes]
        descriptors = [Descriptor(f.fd, f.fd, draw(st.booleans())) for f in vmm.files]
        if pipe_ids:
            descriptors.append(Descriptor(1024, 1024, False, pipe_ids[0], draw(u32)))
        vmm = replace(vmm, os=replace(guest_os, descriptors=tuple(descriptors)))
    state = VmState(vcpus=vcpu_list, memory=tuple(r for r, _ in region_pairs), vmm=vmm,
                    extra=tuple(draw(st.lists(extras, max_size=2))))
    return state, [contents for _, contents in region_pairs]


def memory_views(contents: list[bytes]) -> list[memoryview]:
    views = []
    for data in contents:
        mapping = mmap.mmap(-1, len(data))
        mapping[:] = data
        views.append(memoryview(mapping))
    return views


def sample_state(pages: int = 32, user_start: int = 0x2000) -> tuple[VmState, list[bytes]]:
    """A fixed, hand-made state: two runs of present pages with holes around them, a file,
    a pending call and an optional section of a future version. The vCPU is in long mode
    with the pending call in rax and rip, so `restorable_sample_state` fits the VMM."""
    contents = bytearray(pages * PAGE_SIZE)
    runs = ((2, 3), (10, 18))
    for first, count in runs:
        for page in range(first, first + count):
            contents[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes([page % 255 + 1]) * PAGE_SIZE
    vcpu = VcpuState(id=0, regs=Registers(rax=1, rip=0x401000, rsp=0x3fff000),
                     sregs=SpecialRegisters(cr0=0x80010033, cr3=0x5000, cr4=0x20, efer=0x501),
                     msrs=((0xC0000082, 0x4800), (0xC0000081, 0x20001000000000)),
                     xsave=bytes(range(256)) * 4, xcrs=((0, 1),), mp_state=0,
                     cpuid=(CpuidEntry(0, eax=0xD), CpuidEntry(1, eax=0xA00F11)))
    vmm = VmmState(program="app", argv=("app", "arg"),
                   files=(OpenFile(0, "stdin", flags=2), OpenFile(3, "file", "dir/data.txt", 0x42,
                                                                 0o644, 17)),
                   address_space=_sample_address_space(pages * PAGE_SIZE, user_start),
                   pending=PendingCall(1, (1, 0x3000, 10, 0, 0, 0), 0x401000))
    extra = (ExtraSection(0x7F00, 0, L.SECTION_OPTIONAL, b"from a newer vmstate"),)
    state = VmState(vcpus=(vcpu,), memory=(MemoryRegion(0, pages * PAGE_SIZE,
                                                          PageSet.from_runs(runs, pages)),), vmm=vmm,
                    extra=extra)
    return state, [bytes(contents)]


LAYOUTS = ("contiguous quarter", "every 4th page", "random quarter", "fully written")


def layout_runs(layout: str, pages: int) -> tuple[tuple[int, int], ...]:
    """Present pages of a region as the benchmarks lay them out: a contiguous quarter, one
    page in four, a quarter chosen at random (seeded), or all of them."""
    if layout == "contiguous quarter":
        return ((pages // 4, pages // 4),)
    if layout == "every 4th page":
        return tuple((page, 1) for page in range(0, pages, 4))
    if layout == "random quarter":
        chosen = bytearray(pages)
        for page in random.Random(pages).sample(range(pages), pages // 4):
            chosen[page] = 1
        return runs_from_bytemap(chosen)
    if layout == "fully written":
        return ((0, pages),)
    raise ValueError(layout)


def layout_state(layout: str, pages: int = 4096) -> tuple[VmState, list[bytes]]:
    """sample_state with its memory laid out as `layout`: each present page holds its number
    and a byte pattern, absent pages are zero."""
    state, _ = sample_state(pages, user_start=0x200000)
    runs = layout_runs(layout, pages)
    contents = bytearray(pages * PAGE_SIZE)
    for first, count in runs:
        for page in range(first, first + count):
            contents[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = \
                page.to_bytes(8, "little") + bytes([page % 251 + 1]) * (PAGE_SIZE - 8)
    region = MemoryRegion(0, pages * PAGE_SIZE, PageSet.from_runs(runs, pages))
    return replace(state, memory=(region,)), [bytes(contents)]


def _sample_address_space(size: int, user_start: int) -> AddressSpace:
    return AddressSpace(user_start=user_start, user_end=size, brk_start=user_start + 0x1000,
                        brk=user_start + 0x1100, mmap_low=size // 2, mmap_top=size * 3 // 4,
                        free_ranges=((size // 2 + 0x1000, 0x1000),))


def restorable_sample_state() -> tuple[VmState, list[bytes]]:
    """The sample state sized for this VMM: 8 MiB of memory, user memory from 2 MiB."""
    return sample_state(pages=2048, user_start=0x200000)
