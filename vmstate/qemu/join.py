"""`vmstate join` of a split QEMU stream: core (memory) + XML (vCPUs, devices, layout) -> a
stream QEMU 7.2 loads. With no edits the stream read by split comes back byte for byte.

Checks, each refused with one line: the core and the XML come from the same stream (digest),
machine type and RAM block sizes agree, every value fits its field (statexml). The summary
names each changed field (device.field old -> new) and each changed page; an edit to CR0, CR4,
EFER, RFLAGS or CS/SS/DS/ES recomputes QEMU's hflags (cpu.derived_hflags)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from ..atomic import atomic_output
from ..background import BackgroundCall
from ..errors import VmstateError
from . import cpu, layout
from .core import QemuCore, QemuCoreError
from .description import Decoder, DescriptionError, Leaf, leaves, parse_description
from .digests import page_digests, sharing_the_gil, unpack_digests
from .gather import GatherWriter
from .machine import placements
from .prefetch import BackgroundMapping
from .statexml import StateDocument, format_leaf, from_xml
from .stream import QemuStream
from .streamwrite import changed_pages, write_stream


class JoinError(VmstateError):
    pass


@dataclass
class JoinResult:
    field_changes: list[tuple[str, str, str]] = field(default_factory=list)
    # block, offset in it, guest physical address (or None), virtual addresses in the core
    page_changes: list[tuple[str, int, int | None, list[int]]] = field(default_factory=list)


def join_stream(core_path: str, xml_path: str, xml_data: bytes, output: str | None,
                symbols=None, mapped_core: BackgroundMapping | None = None) -> str:
    """Validate, summarise and (unless output is None) write the joined stream.
    `mapped_core`: the core's mapping, if the caller started it (prefetch)."""
    if mapped_core is None:
        mapped_core = BackgroundMapping(core_path, "core file", QemuCoreError)
    document = from_xml(xml_data, xml_path)
    stream = document.stream
    with QemuCore(core_path, mapped_core) as core:
        _check_matches(core, document, core_path, xml_path)
        _check_complete(core, stream, xml_path)
        memory = [core.block_memory(block.name) for block in stream.blocks]
        try:
            result = JoinResult()
            _device_changes(core, document, xml_path, result)
            digests = document.provenance.page_digests
            if output is None:
                _page_changes(stream, memory, digests, result)
            else:
                _write_finding_page_changes(output, stream, memory, digests, result)
            result.page_changes = [(block, offset, physical,
                                    core.virtual_addresses(physical) if physical is not None
                                    else []) for block, offset, physical, _ in result.page_changes]
            summary = render_summary(result, stream.machine, symbols)
        finally:
            memory.clear()          # the arrays borrow the core's mapping
    return summary


def _write_finding_page_changes(output: str, stream: QemuStream, memory, digests: bytes,
                                result: JoinResult) -> None:
    """Write the joined stream while a thread hashes the pages to find the changed ones (the
    hashing runs while the kernel copies pages); an error in either leaves no output."""
    checking = BackgroundCall(lambda: _page_changes(stream, memory, digests, result),
                              "page-changes")
    try:
        with sharing_the_gil(), atomic_output(output, durable=False) as f:
            out = GatherWriter(f.fileno())
            write_stream(out, stream, memory)
            out.finish()
            checking.result()
    except OSError as e:
        raise JoinError(f"cannot write {output}: {e.strerror}") from None
    finally:
        with contextlib.suppress(BaseException):
            checking.result()           # done with the core's mapping before it is closed


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
    covered = [np.zeros(block.pages, dtype=np.int32) for block in stream.blocks]   # no wrap at 256
    for section in stream.sections:
        for run in section.runs:
            covered[run.block][run.first_page:run.first_page + run.count] += 1
    for block, counts in zip(stream.blocks, covered):
        wrong = np.flatnonzero(counts != 1)
        if len(wrong):
            page = int(wrong[0])
            state = "in no run" if counts[page] == 0 else "in more than one run"
            raise JoinError(f"{xml_path}: page {page:#x} of RAM block {block.name!r} is {state} "
                            f"({len(wrong)} such pages); every page must be sent once")


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

def _page_changes(stream: QemuStream, memory, digests: bytes, result: JoinResult) -> None:
    """Pages whose bytes differ from split's: PAGE-run pages by digest, ZERO-run pages by fill."""
    if len(digests) % 8:
        raise JoinError("the XML's page digests are cut short")
    expected = unpack_digests(digests)
    position = 0
    for section in stream.sections:
        for run in section.runs:
            if run.zero:
                pages = memory[run.block][run.first_page * layout.PAGE_SIZE:
                                          (run.first_page + run.count) * layout.PAGE_SIZE]
                grid = pages.reshape(run.count, layout.PAGE_SIZE)
                for index in np.flatnonzero(changed_pages(grid, run.fill)).tolist():
                    _record_page(stream, run.block, run.first_page + index, result)
                continue
            if position + run.count > len(expected):
                raise JoinError("the XML has fewer page digests than PAGE records")
            found = np.frombuffer(page_digests(memory[run.block],
                                               run.first_page * layout.PAGE_SIZE,
                                               layout.PAGE_SIZE, run.count), np.uint64)
            changed = np.flatnonzero(found != expected[position:position + run.count])
            for index in changed.tolist():
                _record_page(stream, run.block, run.first_page + index, result)
            position += run.count
    if position != len(expected):
        raise JoinError("the XML has more page digests than PAGE records")


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
