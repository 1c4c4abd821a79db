"""`vmstate split` of a QEMU stream: vm.core (every RAM block, vCPU notes) + hw.xml."""

from __future__ import annotations

import bisect
import os
import struct
import sys
from array import array
from functools import partial

import xxhash

from ..atomic import atomic_output
from ..background import ForkedCall
from ..errors import VmstateError
from ..fd import pwrite_all
from . import cpu, layout
from .core import CorePages, QemuCore, guest_mappings, plan_core
from .description import encode_group, leaves
from .digests import page_digests
from .machine import placements
from .stream import QemuStream, StreamError, open_stream


def stream_digest(stream: QemuStream) -> int:
    """XXH3-64 over what identifies a stream apart from its pages: machine, blocks, sections'
    device bytes, description."""
    h = xxhash.xxh3_64()
    h.update(stream.machine.encode("latin-1"))
    for block in stream.blocks:
        h.update(block.name.encode("latin-1") + struct.pack("<Q", block.size))
    for section in stream.device_sections():
        parts: list[bytes] = []
        encode_group(section.device, parts)
        h.update(struct.pack("<I", section.section_id) + b"".join(parts))
    h.update(stream.description)
    return h.intdigest()


def vcpu_views(stream: QemuStream) -> list[cpu.VcpuView]:
    views = []
    for section in stream.device_sections():
        if section.name != cpu.CPU_SECTION:
            continue
        try:
            views.append(cpu.view_of(section.instance, dict(leaves(section.device))))
        except KeyError as e:
            raise StreamError(f"section 'cpu' instance {section.instance}: no {e.args[0]} field "
                              "as QEMU 7.2 x86 writes it", stream.path) from None
    if not views:
        raise StreamError("no cpu section: not an x86 machine stream", stream.path)
    return views


class StreamMemory:
    """Guest physical reads from the stream's own page records (for the page-table walk)."""

    def __init__(self, stream: QemuStream):
        self.stream = stream
        self.runs = {}
        for section in stream.sections:
            for run in section.runs:
                self.runs.setdefault(run.block, []).append(run)
        for runs in self.runs.values():
            runs.sort(key=lambda r: r.first_page)

    def read_phys(self, address: int, length: int) -> bytes:
        for index, block in enumerate(self.stream.blocks):
            for part in placements(self.stream.machine, block):
                if part.address <= address and address + length <= part.address + part.length:
                    return self._read_block(index, part.offset + address - part.address, length)
        raise VmstateError(f"physical address {address:#x} is not in guest memory")

    def _read_block(self, block: int, offset: int, length: int) -> bytes:
        page, within = divmod(offset, layout.PAGE_SIZE)
        if within + length > layout.PAGE_SIZE:
            raise VmstateError("read across a page")
        runs = self.runs.get(block, [])
        i = bisect.bisect_right([r.first_page for r in runs], page) - 1
        if i < 0 or page >= runs[i].first_page + runs[i].count:
            return bytes(length)
        run = runs[i]
        if run.zero:
            return bytes([run.fill]) * length
        return self.stream.page(run, page - run.first_page)[within:within + length]


def _write_xml(path: str, core_path: str, xml_path: str, fd: int) -> None:
    """The XML into `fd` (xml_path's file), from a reading of the stream of its own (run in
    a forked child, so the page digests are taken on the other core while the parent writes
    the core)."""
    digests = array("Q")
    with open_stream(path, partial(_hash_pages, digests)) as stream:
        views = vcpu_views(stream)
        from .statexml import Provenance, document_tree, render
        provenance = Provenance(stream_digest(stream), os.path.basename(path),
                                os.path.basename(core_path), b"")
        tree = document_tree(stream, provenance, views)
    if sys.byteorder != "little":
        digests.byteswap()
    try:
        pwrite_all(fd, render(tree, digests.tobytes()), 0)
    except OSError as e:
        raise VmstateError(f"cannot write {xml_path}: {e.strerror}") from None


def _hash_pages(digests: array, blocks, run, index: int, payloads, count: int) -> None:
    digests.extend(page_digests(payloads, 0, layout.PAGE_SIZE, count))


def _write_core(path: str, core_path: str, fd: int) -> tuple[QemuStream, int]:
    """The core into `fd`: the pages as the stream is read, then the headers (which need
    the device sections after the pages, and the page tables among them). Returns the
    stream and the number of PT_LOAD segments."""
    pages = CorePages(fd, core_path)
    with open_stream(path, pages.write, pages.write_fill) as stream:
        views = vcpu_views(stream)
        digest = stream_digest(stream)
        mappings = guest_mappings(stream, views[0], StreamMemory(stream).read_phys)
        plan = plan_core(stream, views, digest, mappings)
        pages.write_headers(plan)
    return stream, plan.segments


def split_stream(path: str, core_path: str, xml_path: str) -> str:
    for output in (core_path, xml_path):
        if os.path.exists(output) and os.path.samefile(output, path):
            raise VmstateError(f"{output}: is the input stream; choose another output name")
    with atomic_output(core_path, durable=False) as core_file, \
            atomic_output(xml_path, durable=False) as xml_file:
        describing = ForkedCall(partial(_write_xml, path, core_path, xml_path,
                                        xml_file.fileno()),
                                "hw.xml")
        try:
            stream, segments = _write_core(path, core_path, core_file.fileno())
            describing.result()
        finally:
            describing.close()
        records = sum(len(s.runs) for s in stream.sections)
        return (f"wrote {core_path} ({len(stream.blocks)} RAM blocks, {segments} "
                f"segments, {stream.machine}) and {xml_path} ({len(stream.device_sections())} "
                f"device sections, {records} page-record runs)")


__all__ = ["QemuCore", "split_stream", "stream_digest", "vcpu_views"]
