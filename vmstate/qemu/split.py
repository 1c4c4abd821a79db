"""`vmstate split` of a QEMU stream: vm.core (every RAM block, vCPU notes) + hw.xml."""

from __future__ import annotations

import bisect
import contextlib
import os
import struct

import numpy as np
import xxhash

from ..atomic import atomic_output
from ..background import BackgroundCall
from ..errors import VmstateError
from . import cpu, layout
from .digests import pack_digests, page_digests, sharing_the_gil
from .core import QemuCore, guest_mappings, plan_core, write_core_file
from .description import encode_group, leaves
from .machine import placements
from .prefetch import BackgroundMapping
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
        return bytes(self.stream.page_payloads(run)[page - run.first_page][within:within + length])


def stream_page_digests(stream: QemuStream) -> np.ndarray:
    """The digest of every PAGE record's page, in stream order (what join compares)."""
    found = [page_digests(stream.data, run.source + run.record_size(stream.blocks)
                          - layout.PAGE_SIZE, run.record_size(stream.blocks), run.count)
             for section in stream.sections for run in section.runs if not run.zero]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.uint64)


def _document_tree(stream: QemuStream, path: str, core_path: str, digest: int,
                   views: list[cpu.VcpuView]):
    """The XML's tree, its page digests to come. Run in a thread beside the core's writing,
    with the import of lxml and the XML modules."""
    from .statexml import Provenance, document_tree
    provenance = Provenance(digest, os.path.basename(path), os.path.basename(core_path), b"")
    return document_tree(stream, provenance, views)


def split_stream(path: str, core_path: str, xml_path: str,
                 mapped: BackgroundMapping | None = None) -> str:
    """`mapped`: the stream's mapping, if the caller started it (prefetch)."""
    for output in (core_path, xml_path):
        if os.path.exists(output) and os.path.samefile(output, path):
            raise VmstateError(f"{output}: is the input stream; choose another output name")
    with open_stream(path, mapped) as stream:
        views = vcpu_views(stream)
        digest = stream_digest(stream)
        mappings = guest_mappings(stream, views[0], StreamMemory(stream).read_phys)
        plan = plan_core(stream, views, digest, mappings)

        hashing = BackgroundCall(lambda: stream_page_digests(stream), "page-digests")
        describing = BackgroundCall(lambda: _document_tree(stream, path, core_path, digest,
                                                           views), "document-tree")
        try:
            with sharing_the_gil():
                write_core_file(core_path, plan, stream)
                digests = hashing.result()
                tree = describing.result()
        except BaseException:
            for call in (hashing, describing):
                with contextlib.suppress(BaseException):
                    call.result()       # done with the stream before it is closed
            raise
        from .statexml import render
        document = render(tree, pack_digests(digests))
        with atomic_output(xml_path, durable=False) as f:
            f.write(document)
        records = sum(len(s.runs) for s in stream.sections)
        return (f"wrote {core_path} ({len(stream.blocks)} RAM blocks, {plan.segments} segments, "
                f"{stream.machine}) and {xml_path} ({len(stream.device_sections())} device "
                f"sections, {records} page-record runs)")


__all__ = ["QemuCore", "split_stream", "stream_digest", "vcpu_views"]
