"""Writing a QEMU 7.2 migration stream (schemas/qemu-stream.md) from the model stream.py
reads plus guest memory: with memory unchanged the bytes are those read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import layout
from .description import encode_group
from .stream import PageRun, QemuStream, RamBlock, Section

ZERO_RECORDS_PER_WRITE = 4096          # ZERO records packed at a time


@dataclass(frozen=True)
class BlockMemory:
    """A RAM block's bytes: `view` for small reads, and file `fd` from `offset` for bulk
    ones (read into a buffer that stays in the cache, with no page tables to fill)."""
    view: memoryview
    fd: int
    offset: int


def write_stream(out, stream: QemuStream, memory: list[BlockMemory],
                 changed: Callable[[PageRun], list[int]]) -> None:
    """Write `stream` through `out` (a gather.GatherWriter), the pages of block i from
    `memory[i]`. `changed(run)` lists the pages of a ZERO run (indices in the run, in
    order) no longer all its fill byte: each becomes a PAGE record."""
    out.write(layout.HEADER.pack(layout.MAGIC, layout.VERSION))
    machine = stream.machine.encode("latin-1")
    out.write(bytes([layout.CONFIGURATION]) + layout.U32.pack(len(machine)) + machine)
    for section in stream.sections:
        out.write(_section_header(section))
        if section.device is not None:
            parts: list[bytes] = []
            encode_group(section.device, parts)
            out.write(b"".join(parts))
        else:
            if section.mem_size:
                out.write(_block_list(stream.blocks))
            for run in section.runs:
                for piece in _pieces(run, changed(run) if run.zero else []):
                    _write_records(out, stream.blocks, piece, memory[run.block])
            out.write(layout.U64.pack(layout.RAM_EOS))
        out.write(bytes([layout.FOOTER]) + layout.U32.pack(section.section_id))
    out.write(bytes([layout.EOF_MARK, layout.VMDESCRIPTION]) +
              layout.U32.pack(len(stream.description)) + stream.description)


def _section_header(section: Section) -> bytes:
    header = bytes([section.kind]) + layout.U32.pack(section.section_id)
    if section.kind in layout.NAMED_SECTIONS:
        name = section.name.encode("latin-1")
        header += bytes([len(name)]) + name + layout.SECTION_IDS.pack(section.instance,
                                                                      section.version)
    return header


def _block_list(blocks: list[RamBlock]) -> bytes:
    parts = [layout.U64.pack(sum(b.size for b in blocks) | layout.RAM_MEM_SIZE)]
    for block in blocks:
        name = block.name.encode("latin-1")
        parts.append(bytes([len(name)]) + name + layout.U64.pack(block.size))
    return b"".join(parts)


def _pieces(run: PageRun, changed: list[int]) -> list[PageRun]:
    """A ZERO run cut into stretches that stay ZERO records and stretches of `changed`
    pages that become PAGE records; any other run whole."""
    if not changed:
        return [run]
    stretches: list[list[int]] = []         # [start, end) of consecutive changed pages
    for index in changed:
        if stretches and index == stretches[-1][1]:
            stretches[-1][1] = index + 1
        else:
            stretches.append([index, index + 1])
    pieces, begin = [], 0
    for start, end in stretches:
        if begin < start:
            pieces.append(_piece(run, begin, start, True))
        pieces.append(_piece(run, start, end, False))
        begin = end
    if begin < run.count:
        pieces.append(_piece(run, begin, run.count, True))
    return pieces


def _piece(run: PageRun, begin: int, end: int, zero: bool) -> PageRun:
    return PageRun(run.block, run.first_page + begin, end - begin, zero, run.fill,
                   run.named and begin == 0)


def _write_records(out, blocks: list[RamBlock], run: PageRun, memory: BlockMemory) -> None:
    """The records of a run: a named run is one record per page, each naming the block."""
    kind = layout.RAM_ZERO if run.zero else layout.RAM_PAGE
    if run.named:
        name = blocks[run.block].name.encode("latin-1")
        for i in range(run.count):
            page = run.first_page + i
            header = layout.U64.pack(page * layout.PAGE_SIZE | kind)
            body = bytes([run.fill]) if run.zero else \
                memory.view[page * layout.PAGE_SIZE:(page + 1) * layout.PAGE_SIZE]
            out.write(header + bytes([len(name)]) + name + body)
        return
    first_header = run.first_page * layout.PAGE_SIZE | kind | layout.RAM_CONTINUE
    if not run.zero:
        out.write_page_records(first_header, memory.fd,
                               memory.offset + run.first_page * layout.PAGE_SIZE, run.count)
        return
    for begin in range(0, run.count, ZERO_RECORDS_PER_WRITE):
        n = min(ZERO_RECORDS_PER_WRITE, run.count - begin)
        out.write(layout.zero_records(first_header + begin * layout.PAGE_SIZE, n, run.fill))
