"""`vmstate join`: a new image from an edited core (memory) and hardware XML (everything else).

Memory comes from the core by physical address; every alias of a page must agree. Pages the
source image did not hold become present only if the core now holds non-zero bytes there,
so join(split(image)) with no edits is the image again, byte for byte."""

from __future__ import annotations

import bisect
import itertools
import mmap
from dataclasses import dataclass, fields, is_dataclass, replace

import xxhash

from . import xsave
from .core import DIRECT_MAP_BASE, Core, Segment, guest_mappings
from .errors import FormatError, VmstateError, shorten
from .hwxml import HardwareDocument, XmlError, from_xml, parse_xml
from .chunks import chunk_checksums, chunk_pages
from .image.reader import ImageMetadata
from .image.writer import write_image
from .mapping import close_mapping, prefetch_runs
from .pages import PageSet, merge_runs
from .sparse import nonzero_pages_outside
from .state import PAGE_SIZE, MemoryRegion, VmState
from .validate import restore_problems
from .x86 import msr_name


@dataclass(frozen=True)
class PageChange:
    physical: int
    virtual: tuple[int, ...]
    kind: str                  # "changed" or "added" (a page the source image did not hold)


@dataclass(frozen=True)
class JoinResult:
    state: VmState
    field_changes: list[tuple[str, str, str]]      # (what, old, new)
    page_changes: list[PageChange]


class _CoreMemory:
    """The core's bytes for each memory region, found through its direct-map segments."""

    def __init__(self, core: Core, regions: tuple[MemoryRegion, ...]):
        self.core = core
        self._map = mmap.mmap(core.fd, core.file_size, mmap.MAP_SHARED, mmap.PROT_READ) \
            if core.file_size else None
        self.offsets = [self._direct_map_offset(i, r) for i, r in enumerate(regions)]
        if self._map is not None:
            for offset, region in zip(self.offsets, regions):
                prefetch_runs(self._map, offset, region.present.runs)
        self.views = [memoryview(self._map)[off:off + r.size]
                      for off, r in zip(self.offsets, regions)]
        self._check_aliases(regions)

    def close(self) -> None:
        self.views = []
        if self._map is not None:
            close_mapping(self._map)

    def _direct_map_offset(self, index: int, region: MemoryRegion) -> int:
        for seg in self.core.segments:
            if seg.vaddr == DIRECT_MAP_BASE + region.guest_phys_addr and seg.size == region.size \
                    and seg.paddr == region.guest_phys_addr:
                return seg.offset
        raise FormatError(f"no segment holds memory region {index} (guest physical "
                          f"{region.guest_phys_addr:#x}+{region.size:#x}): not a core written "
                          "by vmstate split", self.core.path)

    def _check_aliases(self, regions) -> None:
        """Every segment showing a physical page must show the same bytes as the others."""
        for seg in self.core.segments:
            index = self._region_of(seg, regions)
            expected = self.offsets[index] + seg.paddr - regions[index].guest_phys_addr
            if seg.offset == expected:
                continue                     # the same file bytes: aliases cannot disagree
            alias = memoryview(self._map)[seg.offset:seg.offset + seg.size]
            mine = memoryview(self._map)[expected:expected + seg.size]
            if alias != mine:
                page = next(p for p in range(0, seg.size, PAGE_SIZE)
                            if alias[p:p + PAGE_SIZE] != mine[p:p + PAGE_SIZE])
                raise FormatError(f"virtual {seg.vaddr + page:#x} and the other mappings of "
                                  f"guest physical {seg.paddr + page:#x} hold different bytes: "
                                  "two aliases of one page were patched differently",
                                  self.core.path)

    def _region_of(self, seg: Segment, regions) -> int:
        for i, r in enumerate(regions):
            if r.guest_phys_addr <= seg.paddr and seg.paddr + seg.size <= r.guest_phys_addr + r.size:
                return i
        raise FormatError(f"segment at virtual {seg.vaddr:#x} maps guest physical "
                          f"{seg.paddr:#x}+{seg.size:#x}, outside guest memory", self.core.path)


def join(core_path: str, xml_path: str, xml_data: bytes) -> tuple[JoinResult, "_Joined"]:
    """Check and combine; returns what changed and an object that writes the image."""
    document = from_xml(xml_data, xml_path)
    core = Core(core_path)
    try:
        source = core.source
        if document.provenance.image_digest != source.digest():
            raise VmstateError(f"{xml_path} and {core_path} come from different images "
                               f"(image digests {document.provenance.image_digest:#x} and "
                               f"{source.digest():#x})")
        _check_layout(document, source, xml_path)
        _check_problems(document.state, xml_path, xml_data)
        memory = _CoreMemory(core, source.state.memory)
    except BaseException:
        core.close()
        raise
    joined = _Joined(core, memory, document, source)
    return joined.result(), joined


def _check_layout(document: HardwareDocument, source: ImageMetadata, xml_path: str) -> None:
    if [(r.guest_phys_addr, r.size, r.present) for r in document.state.memory] != \
            [(r.guest_phys_addr, r.size, r.present) for r in source.state.memory]:
        raise XmlError(f"{xml_path}: the <memory> layout differs from the core's; it describes "
                       "the source image and cannot be edited")


def _check_problems(state: VmState, xml_path: str, xml_data: bytes) -> None:
    """Refuse what restore would refuse, naming the element and the value."""
    found = restore_problems(state)
    if found:
        problem = found[0]
        tree = parse_xml(xml_data, xml_path)
        hits = tree.xpath(problem.xpath.replace("/vmstate-hardware", "/*", 1))
        element = hits[0] if hits else tree
        value = element.get(problem.attribute) if problem.attribute else None
        named = f' name="{shorten(element.get("name"))}"' if element.get("name") else ""
        shown = f"<{element.tag}{named} {problem.attribute}=\"{shorten(value)}\">" \
            if value is not None else f"<{element.tag}{named}>"
        raise XmlError(f"{xml_path}:{element.sourceline}: {shown}: {problem.message}")


class _Joined:
    def __init__(self, core: Core, memory: _CoreMemory, document: HardwareDocument,
                 source: ImageMetadata):
        self.core, self.memory, self.document, self.source = core, memory, document, source
        self.added = [nonzero_pages_outside(core.fd, offset, view, region.present.runs)
                      for region, offset, view in zip(source.state.memory, memory.offsets,
                                                      memory.views)]
        self.state = replace(document.state, memory=self._present_regions())
        # Chunk checksums of the core's bytes over the source's present pages: compared with
        # the source's to find changes, and written as they are where no page was added.
        self.core_hashes = [chunk_checksums(view, region.present.runs, region.size // PAGE_SIZE)
                            for region, view in zip(source.state.memory, memory.views)]

    def close(self) -> None:
        self.memory.close()
        self.core.close()

    def _present_regions(self) -> tuple[MemoryRegion, ...]:
        """The source's present pages, plus never-touched pages the core now holds data in."""
        return tuple(replace(region, present=PageSet.from_runs(
                         merge_runs(tuple(sorted(region.present.runs + added))),
                         region.page_count))
                     for region, added in zip(self.source.state.memory, self.added))

    def result(self) -> JoinResult:
        return JoinResult(self.state, diff_states(self.source.state, self.state),
                          self._page_changes())

    def _page_changes(self) -> list[PageChange]:
        mappings = sorted(guest_mappings(self.source, self._read_phys), key=lambda m: not m.user)
        changes = []
        for i, old in enumerate(self.source.state.memory):
            for page in self._changed_pages(i):
                changes.append(self._change(old, page, "changed", mappings))
            for page in _pages(self.added[i]):
                changes.append(self._change(old, page, "added", mappings))
        return sorted(changes, key=lambda c: c.physical)

    @staticmethod
    def _change(region: MemoryRegion, page: int, kind: str, mappings) -> PageChange:
        physical = region.guest_phys_addr + page * PAGE_SIZE
        return PageChange(physical, tuple(m.virtual + physical - m.physical for m in mappings
                                          if m.physical <= physical < m.physical + m.size), kind)

    def _changed_pages(self, index: int) -> list[int]:
        """Present pages whose bytes differ from the source image's: chunk checksums are
        compared first (the source's are in the core's copy of the image metadata), and only
        the present pages of differing chunks, page by page, against the XML's per-page
        digests."""
        view, region = self.memory.views[index], self.source.state.memory[index]
        source_hashes = self.source.region_data[index].chunk_hashes
        if self.core_hashes[index] == source_hashes:
            return []
        digests = memoryview(self.document.provenance.page_digests[index]).cast("Q") \
            if self.document.provenance.page_digests[index] else None
        position = _PresentIndex(region.present.runs)
        changed = []
        for chunk, (now, before) in enumerate(zip(self.core_hashes[index], source_hashes)):
            if now == before:
                continue
            first, count = chunk_pages(chunk, region.size // PAGE_SIZE)
            for page in position.present_in(first, first + count):
                now = xxhash.xxh3_64_intdigest(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
                if digests is None or now != digests[position.of(page)]:
                    changed.append(page)
        return changed

    def _read_phys(self, address: int, length: int) -> bytes:
        for region, view in zip(self.source.state.memory, self.memory.views):
            offset = address - region.guest_phys_addr
            if 0 <= offset and offset + length <= region.size:
                return bytes(view[offset:offset + length])
        raise VmstateError(f"guest physical {address:#x} is outside guest memory")

    def write(self, output: str) -> None:
        known = [hashes if not added else None
                 for hashes, added in zip(self.core_hashes, self.added)]
        write_image(output, self.state, list(self.memory.views), known, durable=False)


def _pages(runs):
    for first, count in runs:
        yield from range(first, first + count)


class _PresentIndex:
    """A present page's position among all present pages (the order of page digests)."""

    def __init__(self, runs):
        self.firsts = [first for first, _ in runs]
        self.before = list(itertools.accumulate((count for _, count in runs), initial=0))
        self.runs = runs

    def of(self, page: int) -> int:
        i = bisect.bisect_right(self.firsts, page) - 1
        return self.before[i] + page - self.runs[i][0]

    def present_in(self, start: int, end: int):
        """The present pages in [start, end), in order."""
        i = max(0, bisect.bisect_right(self.firsts, start) - 1)
        while i < len(self.runs) and self.runs[i][0] < end:
            first, count = self.runs[i]
            yield from range(max(first, start), min(first + count, end))
            i += 1


# -- what changed ------------------------------------------------------------------------------

def diff_states(old: VmState, new: VmState) -> list[tuple[str, str, str]]:
    """(what, old value, new value) for every field that differs, memory aside."""
    changes = []
    for vo, vn in zip(old.vcpus, new.vcpus):
        prefix = f"vcpu {vo.id}"
        for name in ("regs", "sregs", "events", "debugregs"):
            changes += _diff_dataclass(f"{prefix} ", getattr(vo, name), getattr(vn, name))
        changes += _diff_keyed(f"{prefix} msr ", dict(vo.msrs), dict(vn.msrs),
                               lambda i: f"{msr_name(i)} ({i:#x})")
        changes += _diff_keyed(f"{prefix} xcr", dict(vo.xcrs), dict(vn.xcrs), str)
        if vo.mp_state != vn.mp_state:
            changes.append((f"{prefix} mp_state", str(vo.mp_state), str(vn.mp_state)))
        changes += _diff_fpu(prefix, vo.xsave, vn.xsave)
        if vo.cpuid != vn.cpuid:
            changes.append((f"{prefix} cpuid", f"{len(vo.cpuid)} leaves", "edited"))
    changes += _diff_files({f.fd: f for f in old.vmm.files}, {f.fd: f for f in new.vmm.files})
    changes += _diff_dataclass("address space ", old.vmm.address_space, new.vmm.address_space)
    if old.vmm.pending != new.vmm.pending:
        changes.append(("pending call", str(old.vmm.pending), str(new.vmm.pending)))
    if old.vmm.sleep_left_ns != new.vmm.sleep_left_ns:
        changes.append(("pending call sleep_left_ns", str(old.vmm.sleep_left_ns),
                        str(new.vmm.sleep_left_ns)))
    changes += _diff_os(old.vmm.os, new.vmm.os)
    changes += _diff_limits(old.vmm.limits, new.vmm.limits)
    return changes


def _diff_limits(old, new) -> list[tuple[str, str, str]]:
    if old is None or new is None:
        return [] if old is new else [("limits", "absent" if old is None else "present",
                                       "absent" if new is None else "present")]
    return [(f"limits {f.name}", str(getattr(old, f.name)), str(getattr(new, f.name)))
            for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def _diff_os(old, new) -> list[tuple[str, str, str]]:
    """The guest OS state: scalar fields one by one, each list as a whole."""
    if old == new:
        return []
    if old is None or new is None:
        return [("guest os", "absent" if old is None else "present",
                 "absent" if new is None else "present")]
    out = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if isinstance(a, tuple) and f.name != "altstack":
            out.append((f"guest os {f.name}", f"{len(a)} entries", f"{len(b)} entries, edited"))
        else:
            out.append((f"guest os {f.name}", _value(a), _value(b)))
    return out


def _value(v) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


def _diff_dataclass(prefix: str, old, new) -> list[tuple[str, str, str]]:
    out = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if is_dataclass(a):
            out += _diff_dataclass(f"{prefix}{f.name}.", a, b)
        else:
            out.append((f"{prefix}{f.name}", _value(a), _value(b)))
    return out


def _diff_keyed(prefix, old: dict, new: dict, label, show=_value) -> list[tuple[str, str, str]]:
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a != b:
            out.append((f"{prefix}{label(key)}", "-" if a is None else show(a),
                        "-" if b is None else show(b)))
    return out


def _diff_files(old: dict, new: dict) -> list[tuple[str, str, str]]:
    out = []
    for fd in sorted(old.keys() | new.keys()):
        a, b = old.get(fd), new.get(fd)
        if a is not None and b is not None:
            out += [(what, before, after) for what, before, after in
                    _diff_dataclass(f"file fd {fd} ", a, b)]
        elif a != b:
            out.append((f"file fd {fd}", _describe_file(a), _describe_file(b)))
    return out


def _describe_file(f) -> str:
    if f is None:
        return "-"
    return f"{f.kind} {f.path!r} flags {f.flags:#x} mode 0{f.mode:o} offset {f.offset}"


def _diff_fpu(prefix: str, old: bytes, new: bytes) -> list[tuple[str, str, str]]:
    if old == new:
        return []
    a, b = xsave.decode(old), xsave.decode(new)
    out = []
    for name in xsave.CONTROL_FIELDS:
        if getattr(a, name) != getattr(b, name):
            out.append((f"{prefix} {name}", _value(getattr(a, name)), _value(getattr(b, name))))
    for kind in ("st", "xmm"):
        for i, (x, y) in enumerate(zip(getattr(a, kind), getattr(b, kind))):
            if x != y:
                out.append((f"{prefix} {kind}{i}", "0x" + x[::-1].hex(), "0x" + y[::-1].hex()))
    if not out:
        out.append((f"{prefix} xsave", f"{len(old)} bytes", f"{len(new)} bytes, edited"))
    return out


def render_summary(result: JoinResult, symbols=None) -> str:
    """The summary join prints; `symbols` (a vmstate.symbols.Symbols) names what pages hold."""
    lines = []
    for what, old, new in result.field_changes:
        lines.append(f"  {what}: {old} -> {new}")
    for change in result.page_changes:
        where = ", ".join(f"{v:#x}" for v in change.virtual[:3]) or "not mapped"
        names = symbols.in_range(change.virtual[0], change.virtual[0] + PAGE_SIZE) \
            if symbols and change.virtual else []
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"  memory page {change.physical:#x} {change.kind} (virtual {where})"
                     + (f" holding {shown}" if shown else ""))
    if not lines:
        return "no changes: the image is rebuilt as it was"
    return "changes against the source image:\n" + "\n".join(lines)
