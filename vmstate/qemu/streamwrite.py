"""Writing a QEMU 7.2 migration stream (schemas/qemu-stream.md) from the model stream.py
reads plus guest memory: with memory unchanged the bytes are those read."""

from __future__ import annotations

import itertools

import numpy as np

from . import layout
from .description import encode_group
from .stream import PageRun, QemuStream, RamBlock, Section

WRITE_CHUNK_PAGES = 8192               # page records prepared at a time


def write_stream(out, stream: QemuStream, memory: list[np.ndarray]) -> None:
    """Write `stream` through `out` (a gather.GatherWriter, or anything with its `write`
    and `write_records`), the pages of block i from `memory[i]` (a flat uint8 array of the
    block's size). A ZERO record whose page is no longer all its fill byte becomes a PAGE
    record."""
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
                _write_run(out, stream.blocks, run, memory[run.block])
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


def _write_run(out, blocks: list[RamBlock], run: PageRun, block_memory: np.ndarray) -> None:
    pages = block_memory[run.first_page * layout.PAGE_SIZE:
                         (run.first_page + run.count) * layout.PAGE_SIZE]
    pages = pages.reshape(run.count, layout.PAGE_SIZE)
    if not run.zero:
        _write_records(out, blocks, run, pages)
        return
    changed = changed_pages(pages, run.fill)
    if not changed.any():
        _write_records(out, blocks, run, None)
        return
    # Split into stretches that stay ZERO records and stretches that become PAGE records.
    edges = np.flatnonzero(np.diff(changed.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), run.count]
    for begin, end in itertools.pairwise(bounds):
        piece = PageRun(run.block, run.first_page + begin, end - begin, not changed[begin],
                        run.fill, run.named and begin == 0)
        _write_records(out, blocks, piece, None if piece.zero else pages[begin:end])


def changed_pages(pages: np.ndarray, fill: int) -> np.ndarray:
    """Per page of a (count, 4096) array: does it hold anything but `fill`? (For fill 0, no
    page-sized temporaries.)"""
    if fill == 0:
        return pages.view(np.uint64).max(axis=1) != 0
    return np.array([(chunk != fill).any() for chunk in pages], dtype=bool)


def _write_records(out, blocks: list[RamBlock], run: PageRun, pages: np.ndarray | None) -> None:
    """The records of a run: a named run is one record per page, each naming the block; the
    pages of PAGE records go from `pages` (the core's mapping) to the file by pwritev."""
    kind = layout.RAM_ZERO if run.zero else layout.RAM_PAGE
    if run.named:
        name = blocks[run.block].name.encode("latin-1")
        for i in range(run.count):
            header = layout.U64.pack((run.first_page + i) * layout.PAGE_SIZE | kind)
            body = bytes([run.fill]) if run.zero else pages[i].tobytes()
            out.write(header + bytes([len(name)]) + name + body)
        return
    flags = np.uint64(kind | layout.RAM_CONTINUE)
    for begin in range(0, run.count, WRITE_CHUNK_PAGES):
        n = min(WRITE_CHUNK_PAGES, run.count - begin)
        numbers = np.arange(run.first_page + begin, run.first_page + begin + n, dtype=np.uint64)
        headers = ((numbers << np.uint64(12)) | flags).astype(">u8").view(np.uint8).reshape(n, 8)
        if run.zero:
            records = np.empty((n, layout.ZERO_RECORD), dtype=np.uint8)
            records[:, :8] = headers
            records[:, 8] = run.fill
            out.write(records)
            continue
        out.write_records(headers, pages[begin:begin + n])
