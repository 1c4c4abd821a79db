"""Reading QEMU 7.2 migration streams (see schemas/qemu-stream.md; streamwrite.py writes them).

`open_stream` parses a whole stream into a `QemuStream`: the machine type, every section in
order (device sections as field trees through the JSON description, the "ram" section as
runs of page records) and the description itself. Page bytes are not kept: each run
remembers where its records start, and a sink given to `open_stream` gets the pages as they
are read.

Anything the reader does not handle (another version, an iterative section other than RAM,
compressed or XBZRLE pages, a stream without its description, a field the description does
not account for) is refused with the section and offset: it never guesses.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from functools import partial
from collections.abc import Callable

from ..errors import FormatError
from ..fd import open_to_read
from . import layout
from .description import Decoder, DescriptionError, Group, parse_description
from .records import RecordStaging, read_run


class StreamError(FormatError):
    pass


@dataclass(frozen=True)
class RamBlock:
    name: str
    size: int

    @property
    def pages(self) -> int:
        return self.size // layout.PAGE_SIZE


@dataclass
class PageRun:
    """Page records of one block in one kind for `count` consecutive pages from `first_page`,
    all laid out alike: a `named` run is one record that names its block; the records of an
    unnamed run continue the previous record's block. `source` is where the first record starts
    in the stream read (-1 for a run made by join)."""
    block: int
    first_page: int
    count: int
    zero: bool
    fill: int = 0
    named: bool = False
    source: int = -1

    def record_size(self, blocks: list[RamBlock]) -> int:
        size = layout.ZERO_RECORD if self.zero else layout.PAGE_RECORD
        return size + (1 + len(blocks[self.block].name.encode("latin-1")) if self.named else 0)


# sink(blocks, run, index, payloads, count): `count` pages of `run` (of block
# blocks[run.block]) from its page `index` on, back to back in `payloads`, valid during the
# call only
PageSink = Callable[[list[RamBlock], PageRun, int, object, int], None]


@dataclass
class Section:
    kind: int                     # layout.SECTION_START / PART / END / FULL
    section_id: int
    name: str
    instance: int
    version: int
    device: Group | None = None   # a device section's fields
    runs: list[PageRun] = field(default_factory=list)     # the ram section's page records
    mem_size: bool = False        # a ram start section: total size and the block list first


@dataclass
class QemuStream:
    path: str
    machine: str
    blocks: list[RamBlock]
    sections: list[Section]
    description: bytes            # the JSON exactly as it was in the stream
    data: mmap.mmap | bytes | None = None

    def device_sections(self) -> list[Section]:
        return [s for s in self.sections if s.device is not None]

    def page(self, run: PageRun, index: int) -> bytes:
        """Page `index` of a PAGE run, read from the stream's mapping."""
        end = run.source + (index + 1) * run.record_size(self.blocks)
        return bytes(self.data[end - layout.PAGE_SIZE:end])

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()
        self.data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- reading ------------------------------------------------------------------------------------

def open_stream(path: str, sink: PageSink | None = None,
                fills: Callable[[list[RamBlock], PageRun], None] | None = None) -> QemuStream:
    """Parse the stream at `path` (refused with a one-line StreamError if bad). Its page
    records are read in bulk (records.read_run), not through the mapping the rest is read
    from. `sink` (a PageSink), if given, gets every PAGE record's page as read, and
    `fills(blocks, run)` every run of ZERO records with a fill other than 0, in stream
    order with them."""
    fd = open_to_read(path, "QEMU stream", StreamError)
    try:
        size = os.fstat(fd).st_size
        data = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else b""
        try:
            return _Reader(path, data, fd, sink, fills).read()
        except BaseException:
            if isinstance(data, mmap.mmap):
                data.close()
            raise
    finally:
        os.close(fd)


class _Reader:
    def __init__(self, path: str, data, fd: int, sink: PageSink | None, fills):
        self.path, self.data, self.end = path, data, len(data)
        self.fd, self.sink, self.fills = fd, sink, fills
        self.staging: dict[int, RecordStaging] = {}     # by payload size
        self.offset = 0
        self.blocks: list[RamBlock] = []
        self.names: dict[int, str] = {}
        self.current_block: int | None = None        # of the last ram record read
        self.section = "stream header"

    def read(self) -> QemuStream:
        try:
            return self._read()
        finally:
            for staging in self.staging.values():
                staging.close()

    def error(self, message: str, offset: int | None = None) -> StreamError:
        where = self.offset if offset is None else offset
        return StreamError(f"{self.section}: {message}", f"{self.path}: offset {where:#x}")

    def take(self, length: int, what: str) -> bytes:
        if self.offset + length > self.end:
            raise self.error(f"{what} runs past the end of the stream ({self.end} bytes): "
                             "truncated stream")
        chunk = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return layout.U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return layout.U64.unpack(self.take(8, what))[0]

    def name(self, what: str) -> str:
        return self.take(self.u8(what), what).decode("latin-1")

    def _read(self) -> QemuStream:
        magic, version = layout.HEADER.unpack(self.take(layout.HEADER.size, "header"))
        if magic != layout.MAGIC:
            raise self.error(f"magic {magic!r}, expected {layout.MAGIC!r}: not a QEMU "
                             "migration stream", 0)
        if version != layout.VERSION:
            raise self.error(f"stream version {version}, this reader handles "
                             f"{layout.VERSION} (QEMU 7.2)", 4)
        devices = self._description()
        self.section = "configuration"
        if self.u8("configuration marker") != layout.CONFIGURATION:
            raise self.error("no configuration section (machine type)", self.offset - 1)
        machine = self.take(self.u32("machine type length"), "machine type").decode("latin-1")
        sections = []
        while True:
            start = self.offset
            marker = self.u8("section marker")
            if marker == layout.EOF_MARK:
                break
            if marker not in layout.SECTION_KIND_NAMES:
                raise self.error(f"unknown section marker {marker:#x}", start)
            sections.append(self._section(marker, devices))
        if devices:
            self.section = "description"
            raise self.error(f"the description lists {len(devices)} more device sections "
                             f"than the stream has ({devices[0].get('name')!r} first)")
        if self.offset != self.description_at:
            self.section = "end of stream"
            raise self.error(f"{self.description_at - self.offset} bytes between the end of "
                             "the sections and the description")
        return QemuStream(self.path, machine, self.blocks, sections, self.description,
                          self.data)

    def _description(self) -> list[dict]:
        """The JSON description at the end of the stream: 0x06, be32 length, JSON. JSON text
        holds no 0x06 byte, so the last one in the stream is its marker."""
        self.section = "description"
        marker = self.data.rfind(bytes([layout.VMDESCRIPTION])) if self.end else -1
        length = layout.U32.unpack(bytes(self.data[marker + 1:marker + 5]))[0] \
            if marker >= 0 and marker + 5 <= self.end else -1
        if marker < 1 or marker + 5 + length != self.end or self.data[marker - 1] != 0:
            raise self.error("no JSON device description at the end of the stream (QEMU "
                             "writes one unless it is turned off, or the stream is truncated); "
                             "refused: without it the device sections cannot be read",
                             self.end)
        self.description = bytes(self.data[marker + 5:self.end])
        self.description_at = marker
        try:
            parsed = parse_description(self.description)
            devices, page_size = parsed["devices"], parsed.get("page_size", layout.PAGE_SIZE)
        except ValueError as e:
            raise self.error(f"the JSON description cannot be read: {e}", marker + 5) from None
        if page_size != layout.PAGE_SIZE:
            raise self.error(f"page size {page_size}, only {layout.PAGE_SIZE} is handled",
                             marker + 5)
        return devices

    def _section(self, kind: int, devices: list[dict]) -> Section:
        start = self.offset - 1
        section_id = self.u32("section id")
        if kind in layout.NAMED_SECTIONS:
            name = self.name("section name")
            instance, version = layout.SECTION_IDS.unpack(self.take(8, "section ids"))
            self.names[section_id] = name
        elif section_id in self.names:
            name, instance, version = self.names[section_id], -1, -1
        else:
            raise self.error(f"section id {section_id} continues no section started", start)
        self.section = f"section {name!r} (id {section_id})"
        section = Section(kind, section_id, name, instance, version)
        if name == layout.RAM_SECTION and kind != layout.SECTION_FULL:
            if kind == layout.SECTION_START and version != layout.RAM_VERSION:
                raise self.error(f"ram section version {version}, handled: "
                                 f"{layout.RAM_VERSION}", start)
            self._ram(section)
        elif kind == layout.SECTION_FULL:
            section.device = self._device(section, devices)
        else:
            raise self.error(f"iterative ({layout.SECTION_KIND_NAMES[kind]}) section is not "
                             "handled (only ram is)", start)
        footer_at = self.offset
        marker = self.u8("section footer")
        footer_id = self.u32("section footer")
        if marker != layout.FOOTER or footer_id != section_id:
            raise self.error(f"section footer {marker:#x} id {footer_id} does not match "
                             f"(expected {layout.FOOTER:#x} id {section_id}): the section's "
                             "data was not what its description says", footer_at)
        return section

    def _device(self, section: Section, devices: list[dict]) -> Group:
        start = self.offset
        if not devices:
            raise self.error("device section not in the JSON description", start)
        entry = devices.pop(0)
        if (entry.get("name"), entry.get("instance_id"), entry.get("version")) != \
                (section.name, section.instance, section.version):
            raise self.error(f"the description has {entry.get('name')!r} instance "
                             f"{entry.get('instance_id')} version {entry.get('version')} here, "
                             f"the stream {section.name!r} instance {section.instance} "
                             f"version {section.version}", start)
        decoder = Decoder(self.data, start, self.description_at)
        try:
            body = decoder.device(entry)
        except DescriptionError as e:
            raise self.error(str(e), e.offset) from None
        self.offset = decoder.offset
        return body

    def _ram(self, section: Section) -> None:
        """Page records up to the end-of-section record, grouped into runs. A record may
        continue the block of the previous section's last record, as QEMU sends them."""
        block = self.current_block
        while True:
            start = self.offset
            header = self.u64("ram record")
            flags, address = header & layout.RAM_FLAG_MASK, header & ~layout.RAM_FLAG_MASK
            if flags & ~layout.RAM_KNOWN_FLAGS:
                raise self.error(f"ram record flags {flags:#x} (compressed, XBZRLE or hook "
                                 "pages) are not handled", start)
            if flags == layout.RAM_EOS:
                self.current_block = block
                return
            if flags == layout.RAM_MEM_SIZE:
                if section.kind != layout.SECTION_START or self.blocks:
                    raise self.error("a second ram block list", start)
                self._ram_blocks(address)
                section.mem_size = True
                continue
            if flags & layout.RAM_CONTINUE:
                if block is None:
                    raise self.error("a ram record continues no block", start)
            else:
                name = self.name("ram block name")
                block = next((i for i, b in enumerate(self.blocks) if b.name == name), None)
                if block is None:
                    raise self.error(f"ram record for unknown block {name!r}", start)
            kind = flags & ~layout.RAM_CONTINUE
            if kind not in (layout.RAM_ZERO, layout.RAM_PAGE):
                raise self.error(f"ram record flags {flags:#x} are not handled", start)
            page = address // layout.PAGE_SIZE
            if page >= self.blocks[block].pages:
                raise self.error(f"page offset {address:#x} outside block "
                                 f"{self.blocks[block].name!r} ({self.blocks[block].size:#x} "
                                 "bytes)", start)
            zero = kind == layout.RAM_ZERO
            named = not flags & layout.RAM_CONTINUE
            fill = self.u8("zero page fill byte") if zero else 0
            run = PageRun(block, page, 1, zero, fill, named, start)
            if named:
                if not zero:
                    page_data = self.take(layout.PAGE_SIZE, "page data")
                    if self.sink is not None:
                        self.sink(self.blocks, run, 0, page_data, 1)
            else:
                run.count = self._continued(run, header)
                if run.count == 0:                      # the first record is cut short
                    self.take(run.record_size(self.blocks) - layout.U64.size, "page data")
                    raise self.error("a page record cannot be read", start)
                self.offset = start + run.count * run.record_size(self.blocks)
            if run.zero and run.fill and self.fills is not None:
                self.fills(self.blocks, run)
            section.runs.append(run)

    def _continued(self, run: PageRun, header: int) -> int:
        """How many records from `run`'s first one on continue it exactly (next page, same
        kind and fill, CONTINUE flag), read in bulk; each stretch of PAGE records goes to
        the sink as read."""
        size = 1 if run.zero else layout.PAGE_SIZE
        if size not in self.staging:
            self.staging[size] = RecordStaging(size)
        staging = self.staging[size]
        sink = None
        if self.sink is not None and not run.zero:
            sink = partial(self.sink, self.blocks, run)
        return read_run(self.fd, staging, run.source, header,
                        self.blocks[run.block].pages - run.first_page,
                        run.fill if run.zero else None, sink)

    def _ram_blocks(self, total: int) -> None:
        remaining = total
        while remaining > 0:
            name = self.name("ram block name")
            size = self.u64("ram block size")
            if size % layout.PAGE_SIZE or size > remaining:
                raise self.error(f"ram block {name!r} size {size:#x} is not whole pages or "
                                 f"exceeds the total {total:#x}")
            self.blocks.append(RamBlock(name, size))
            remaining -= size
