"""`vmstate join` of a split QEMU stream: core (memory) + XML (vCPUs, devices, layout) -> a
stream QEMU 7.2 loads. With no edits the stream read by split comes back byte for byte.

Checks, each refused with one line: the core and the XML come from the same stream (digest),
machine type and RAM block sizes agree, every value fits its field (statexml). The summary
names each changed field (device.field old -> new) and each changed page; an edit to CR0, CR4,
EFER, RFLAGS or CS/SS/DS/ES recomputes QEMU's hflags (cpu.derived_hflags)."""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import partial

from ..atomic import atomic_output
from ..background import ForkedCall
from ..errors import VmstateError
from ..fd import read_exactly
from ..pages import is_zero
from ..sparse import data_segments
from . import cpu, layout
from .core import QemuCore
from .description import Decoder, DescriptionError, Leaf, leaves, parse_description
from .digests import page_digests
from .gather import GatherWriter
from .machine import placements
from .statexml import StateDocument, format_leaf, from_xml
from .stream import PageRun, QemuStream
from .streamwrite import BlockMemory, write_stream


FILL_COMPARE_PAGES = 256        # pages of a ZERO run compared with its fill at once
DIGEST_READ_PAGES = 512         # pages read at a time to check their digests


class JoinError(VmstateError):
    pass


@dataclass
class JoinResult:
    field_changes: list[tuple[str, str, str]] = field(default_factory=list)
    # block, offset in it, guest physical address (or None), virtual addresses in the core
    page_changes: list[tuple[str, int, int | None, list[int]]] = field(default_factory=list)


def join_stream(core_path: str, xml_path: str, xml_data: bytes, output: str | None,
                symbols=None) -> str:
    """Validate, summarise and (unless output is None) write the joined stream."""
    document = from_xml(xml_data, xml_path)
    stream = document.stream
    with QemuCore(core_path) as core:
        _check_matches(core, document, core_path, xml_path)
        _check_complete(core, stream, xml_path)
        digests = document.provenance.page_digests
        _check_digest_count(stream, digests, xml_path)
        result = JoinResult()
        _device_changes(core, document, xml_path, result)
        memory = [core.block_memory(block.name) for block in stream.blocks]
        try:
            runs = [run for section in stream.sections for run in section.runs]
            zero_changes = _zero_run_changes(core, runs, memory)
            checking = ForkedCall(partial(_changed_page_records, runs, memory, digests),
                                  "page digests")
            try:
                if output is not None:
                    changed = {id(runs[number]): pages for number, pages in zero_changes.items()}
                    _write(output, core_path, stream, memory,
                           lambda run: changed.get(id(run), []))
                page_changes = checking.result()
            finally:
                checking.close()
            page_changes += [(number, index) for number, pages in zero_changes.items()
                             for index in pages]
            for number, index in sorted(page_changes):
                _record_page(stream, runs[number].block, runs[number].first_page + index,
                             result)
            result.page_changes = [(block, offset, physical,
                                    core.virtual_addresses(physical) if physical is not None
                                    else []) for block, offset, physical, _ in result.page_changes]
            summary = render_summary(result, stream.machine, symbols)
        finally:
            for block in memory:
                block.view.release()        # they borrow the core's mapping
    return summary


def _write(output: str, core_path: str, stream: QemuStream, memory: list[BlockMemory],
           changed) -> None:
    """The joined stream, named only when complete."""
    try:
        with atomic_output(output, durable=False) as f:
            out = GatherWriter(f.fileno())
            write_stream(out, stream, memory, changed)
            out.finish()
    except EOFError:
        raise JoinError(f"{core_path} was cut short while being joined") from None
    except OSError as e:
        raise JoinError(f"cannot write {output}: {e.strerror}") from None


def _check_matches(core: QemuCore, document: StateDocument, core_path: str, xml_path: str):
    stream = document.stream
    if core.machine != stream.machine:
        raise JoinError(f"{xml_path} is for machine type {stream.machine}, {core_path} for "
                        f"{core.machine}: they come from different VMs")
    for block in stream.blocks:
        found = core.blocks.get(block.name)
        if found is None:
            raise JoinError(f"{xml_path}: RAM block {block.name!r} is not in {core_path}")
        if found.size != block.size:
            raise JoinError(f"{xml_path}: RAM block {block.name!r} is {block.size:#x} bytes, in "
                            f"{core_path} {found.size:#x}: another RAM size")
    if len(core.blocks) != len(stream.blocks):
        extra = sorted(set(core.blocks) - {b.name for b in stream.blocks})
        raise JoinError(f"{core_path} has RAM blocks {xml_path} does not list: {extra}")
    if core.digest != document.provenance.stream_digest:
        raise JoinError(f"{core_path} was split from another stream than {xml_path} (stream "
                        f"digest {core.digest:#x}, the XML's {document.provenance.stream_digest:#x})")


def _check_complete(core: QemuCore, stream: QemuStream, xml_path: str) -> None:
    """Every device section of the stream, in its order, and every page of every block in
    exactly one run: QEMU silently keeps a device's reset state, or a page's, when its
    section or record is missing."""
    ids = [section.section_id for section in stream.device_sections()]
    if ids != list(core.devices):
        missing = [i for i in core.devices if i not in ids]
        what = f"sections with ids {missing} are missing" if missing else \
            "device sections were added or reordered"
        raise JoinError(f"{xml_path}: {what} (the stream had ids {list(core.devices)}); QEMU "
                        "would reset a device whose section is missing")
    for index, block in enumerate(stream.blocks):
        runs = [(run.first_page, run.count) for section in stream.sections
                for run in section.runs if run.block == index]
        wrong, first = _pages_not_sent_once(runs, block.pages)
        if wrong:
            state = "in no run" if first[1] == 0 else "in more than one run"
            raise JoinError(f"{xml_path}: page {first[0]:#x} of RAM block {block.name!r} is "
                            f"{state} ({wrong} such pages); every page must be sent once")


def _pages_not_sent_once(runs: list[tuple[int, int]], pages: int) -> tuple[int, tuple]:
    """How many of a block's `pages` the (first page, count) runs cover other than once,
    and (page, times covered) of the first such page: a sweep over the runs' ends."""
    edges: dict[int, int] = {0: 0, pages: 0}
    for first, count in runs:
        edges[first] = edges.get(first, 0) + 1
        edges[first + count] = edges.get(first + count, 0) - 1
    wrong, first_wrong, depth = 0, None, 0
    points = sorted(edges)
    for start, end in zip(points, points[1:]):
        depth += edges[start]
        if depth != 1 and start < pages:
            wrong += min(end, pages) - start
            first_wrong = first_wrong or (start, depth)
    return wrong, first_wrong


def _check_digest_count(stream: QemuStream, digests: bytes, xml_path: str) -> None:
    """One digest per PAGE record, as split wrote them."""
    expected = sum(run.count for section in stream.sections for run in section.runs
                   if not run.zero)
    if len(digests) % 8 or len(digests) // 8 != expected:
        raise JoinError(f"{xml_path}: {len(digests) / 8:g} page digests for {expected} PAGE "
                        "records: the XML's <page-digests> were cut short or added to")


def _device_changes(core: QemuCore, document: StateDocument, xml_path: str,
                    result: JoinResult) -> None:
    """Compare every device section with the original bytes the core kept; recompute hflags
    where the derived registers changed."""
    try:
        descriptions = parse_description(document.stream.description)["devices"]
    except ValueError as e:
        raise JoinError(f"{xml_path}: <description> cannot be read: {e}") from None
    stream = document.stream
    for section, entry in zip(stream.device_sections(), descriptions):
        original_bytes = core.devices.get(section.section_id)
        if original_bytes is None:
            raise JoinError(f"section {section.name!r} (id {section.section_id}) is not in the "
                            "core's record of the stream")
        try:
            decoder = Decoder(original_bytes, 0, len(original_bytes))
            original = decoder.device(entry)
        except DescriptionError as e:
            raise JoinError(f"section {section.name!r}: the core's copy does not parse: {e}") \
                from None
        before = dict(leaves(original))
        _check_same_fields(section.name, dict(leaves(section.device)), before)
        if section.name == cpu.CPU_SECTION:        # after the check: it reads typed fields
            _fix_hflags(section, original, result)
        for path, leaf in leaves(section.device):
            old = before[path]
            if leaf.data != old.data:
                result.field_changes += _leaf_changes(f"{_device_name(section)}.{path}", old,
                                                      leaf, section.name == cpu.CPU_SECTION)


def _check_same_fields(name: str, now: dict, before: dict) -> None:
    """The edited section has the stream's fields, each of its type, size and count."""
    if set(now) != set(before):
        missing = sorted(set(before) ^ set(now))[:3]
        raise JoinError(f"section {name!r}: fields differ from the stream's: "
                        f"{', '.join(missing)} (fields cannot be added or removed)")
    for path, leaf in now.items():
        old = before[path]
        if (leaf.type, leaf.size, leaf.count) != (old.type, old.size, old.count):
            raise JoinError(f"{name}.{path}: type or size changed "
                            f"({old.type}/{old.size}x{old.count} -> "
                            f"{leaf.type}/{leaf.size}x{leaf.count})")


def _leaf_changes(what: str, old: Leaf, new: Leaf, is_cpu: bool) -> list[tuple[str, str, str]]:
    """One change per changed element of an array (named as <vcpu> names it, if it is a
    register), or the whole field."""
    if old.count == 1:
        return [(what, format_leaf(old), format_leaf(new))]
    path = what.split(".", 1)[1]
    names = [key[1] for key in cpu.REGISTER_FIELDS.get(path, [])] if is_cpu else []
    changes = []
    for index in range(old.count):
        before = old.data[index * old.size:(index + 1) * old.size]
        after = new.data[index * new.size:(index + 1) * new.size]
        if before != after:
            label = f"{what}[{index}]" + (f" ({names[index]})" if names else "")
            changes.append((label, format_leaf(Leaf(old.name, old.type, old.size, 1, before)),
                            format_leaf(Leaf(new.name, new.type, new.size, 1, after))))
    return changes


def _device_name(section) -> str:
    return section.name if section.instance == 0 else f"{section.name}[{section.instance}]"


def _fix_hflags(section, original, result: JoinResult) -> None:
    now_fields, old_fields = dict(leaves(section.device)), dict(leaves(original))
    now_view = cpu.view_of(section.instance, now_fields)
    old_view = cpu.view_of(section.instance, old_fields)
    if cpu.inputs_of(now_view.values) == cpu.inputs_of(old_view.values):
        return
    hflags: Leaf = now_fields["env.hflags"]
    (current,) = hflags.values()
    if not old_view.hflags_derived:
        raise JoinError(f"vCPU {section.instance}: CR0/CR4/EFER/RFLAGS/segments were edited, but "
                        f"QEMU's saved hflags ({current:#x}) do not follow from the saved registers "
                        "the way vmstate derives them, so they cannot be kept consistent; "
                        "edit env.hflags to match or leave those registers as they were")
    wanted = cpu.derived_hflags(current, cpu.inputs_of(now_view.values))
    if wanted != current:
        hflags.data = wanted.to_bytes(hflags.size, "big")


# -- pages ---------------------------------------------------------------------------------------

def _changed_page_records(runs: list[PageRun], memory: list[BlockMemory],
                          digests: bytes) -> list[tuple[int, int]]:
    """(run number, page in the run) of each PAGE-run page whose digest differs from the
    one split took (run in a forked child: the hashing holds the GIL)."""
    expected = array("Q")
    expected.frombytes(digests)
    if sys.byteorder != "little":
        expected.byteswap()
    buffer = memoryview(bytearray(DIGEST_READ_PAGES * layout.PAGE_SIZE))
    changed, position = [], 0
    for number, run in enumerate(runs):
        if run.zero:
            continue
        found = array("Q")
        block = memory[run.block]
        for begin in range(0, run.count, DIGEST_READ_PAGES):
            n = min(DIGEST_READ_PAGES, run.count - begin)
            try:
                read_exactly(block.fd, buffer[:n * layout.PAGE_SIZE],
                             block.offset + (run.first_page + begin) * layout.PAGE_SIZE)
            except EOFError:
                raise JoinError("the core was cut short while being joined") from None
            found.extend(page_digests(buffer, 0, layout.PAGE_SIZE, n))
        wanted = expected[position:position + run.count]
        if found != wanted:
            changed += [(number, i) for i, (a, b) in enumerate(zip(found, wanted)) if a != b]
        position += run.count
    return changed


def _zero_run_changes(core: QemuCore, runs: list[PageRun],
                      memory: list[BlockMemory]) -> dict[int, list[int]]:
    """Run number -> pages (in the run) of each ZERO run no longer all its fill byte. For a
    fill of 0 only what the core's file system stores is looked at: split leaves such
    pages as holes, so a core nobody wrote to costs one FIEMAP, not a read of its zeros."""
    segments = data_segments(core.fd, 0, len(core.data))
    starts = [start for start, _ in segments]
    changes = {}
    for number, run in enumerate(runs):
        if not run.zero:
            continue
        block = memory[run.block]
        begin = run.first_page * layout.PAGE_SIZE
        end = begin + run.count * layout.PAGE_SIZE
        if run.fill:
            stored = [(begin, end)]
        else:
            stored = _overlaps(segments, starts, block.offset + begin, block.offset + end,
                               block.offset)
        pages = sorted({page for first, last in stored      # widened parts may share pages
                        for page in _pages_not_filled(block.view, first, last, run.fill)})
        if pages:
            changes[number] = [page - run.first_page for page in pages]
    return changes


def _overlaps(segments, starts: list[int], begin: int, end: int, base: int):
    """The parts of [begin, end) inside `segments` (sorted (start, end) pairs), less
    `base`, widened to whole pages."""
    found = []
    for index in range(max(0, bisect_right(starts, begin) - 1), len(segments)):
        start, stop = segments[index]
        if start >= end:
            break
        if stop > begin:
            first = (max(start, begin) - base) // layout.PAGE_SIZE * layout.PAGE_SIZE
            last = min(stop, end) - base
            found.append((first, -(-last // layout.PAGE_SIZE) * layout.PAGE_SIZE))
    return found


def _pages_not_filled(view: memoryview, begin: int, end: int, fill: int) -> list[int]:
    """Page numbers in [begin, end) (page-aligned offsets in `view`) holding anything but
    `fill`; each FILL_COMPARE_PAGES pages are compared at once, page by page only if they
    differ."""
    size, step = layout.PAGE_SIZE, FILL_COMPARE_PAGES * layout.PAGE_SIZE
    if fill == 0:
        def filled(piece) -> bool:
            return is_zero(piece)
    else:
        pattern = bytes([fill]) * step

        def filled(piece) -> bool:
            return piece == pattern[:len(piece)]
    found = []
    for start in range(begin, end, step):
        stop = min(end, start + step)
        if not filled(view[start:stop]):
            found += [offset // size for offset in range(start, stop, size)
                      if not filled(view[offset:offset + size])]
    return found


def _record_page(stream: QemuStream, block: int, page: int, result: JoinResult) -> None:
    offset = page * layout.PAGE_SIZE
    physical = None
    for part in placements(stream.machine, stream.blocks[block]):
        if part.offset <= offset < part.offset + part.length:
            physical = part.address + offset - part.offset
    result.page_changes.append((stream.blocks[block].name, offset, physical, []))


def render_summary(result: JoinResult, machine: str, symbols=None) -> str:
    lines = [f"  {what}: {old} -> {new}" for what, old, new in result.field_changes]
    for block, offset, physical, virtuals in result.page_changes:
        where = f"{block} +{offset:#x}" + (f" (guest physical {physical:#x}" if physical
                                            is not None else "")
        shown_virtual = [v for v in virtuals if v != physical][:2]
        if shown_virtual:
            where += ", virtual " + ", ".join(f"{v:#x}" for v in shown_virtual)
        where += ")" if physical is not None else ""
        names = []
        for address in virtuals if symbols else []:
            names += [n for n in symbols.in_range(address, address + layout.PAGE_SIZE)
                      if n not in names]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"  memory page {where} changed" + (f" holding {shown}" if shown else ""))
    if not lines:
        return f"no changes: the {machine} stream is rebuilt as it was"
    return "changes against the source stream:\n" + "\n".join(lines)
