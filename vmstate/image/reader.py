"""Open an image file and check it: every structure, every bound, every checksum.

Metadata (header, table, sections) is read and verified at open; memory chunks are verified
by `Image.verify_memory`, which restore runs in a child process while it starts the guest."""

from __future__ import annotations

import contextlib
import mmap
import os
from array import array
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import xxhash

from ..background import BackgroundCall, ForkedCall
from ..errors import ImageError
from ..fd import FdOwner, open_to_read
from ..chunks import (
    CHUNK_SHIFT, chunk_pages, file_chunk_checksums, first_bad_chunk, share_of_chunks)
from ..mapping import close_mapping, prefetch_runs
from ..pages import Runs
from ..sparse import nonzero_pages_outside
from ..validate import problems
from ..state import PAGE_SIZE, ExtraSection, MemoryRegion, VcpuState, VmmState, VmState
from . import codec
from .os_codec import decode_os
from . import layout as L

MAX_SECTIONS = 1 << 16
MAX_SECTION_SIZE = 1 << 28      # a 64 GiB region's payload is 2.5 MiB, however fragmented
PADDING_CHUNK = 1 << 20


@dataclass(frozen=True)
class SectionEntry:
    index: int
    type: int
    flags: int
    instance: int
    offset: int
    size: int
    hash: int

    @property
    def name(self) -> str:
        return L.SECTION_NAMES.get(self.type, f"type {self.type:#06x}")

    def describe(self) -> str:
        return f"section {self.index} ({self.name}, instance {self.instance})"


@dataclass(frozen=True)
class RegionData:
    """Where a memory region's pages live in the file, and their chunk checksums."""
    data_offset: int
    chunk_hashes: array


def checksum(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


class ImageMetadata:
    """An image's header, section table and decoded sections, checked. `read(offset, length)`
    gives the file's bytes. A file_size of None means only the metadata is at hand (the copy
    a core file carries): the size is then taken from the header."""

    def __init__(self, name: str, read, file_size: int | None):
        self.path = name
        self._read_bytes = read
        self.file_size = file_size
        self.version, self.sections = self._read_header_and_table()
        self.region_data: list[RegionData] = []   # filled with the regions, by index
        self.state = self._decode_sections()
        self._check_padding()

    @property
    def metadata_size(self) -> int:
        """Bytes from the start of the file to the first byte of guest memory (the header,
        table, payloads and the zero padding after them)."""
        payloads_end = max([L.HEADER.size + L.SECTION_ENTRY.size * len(self.sections)]
                           + [e.offset + e.size for e in self.sections])
        return min((d.data_offset for d in self.region_data), default=payloads_end)

    def metadata(self) -> bytes:
        return self._read_bytes(0, self.metadata_size)

    def digest(self) -> int:
        """XXH3-64 of the metadata: it covers every section and every memory checksum, so
        it identifies the whole image."""
        return checksum(self.metadata())

    def _error(self, message: str, offset: int) -> ImageError:
        return ImageError(message, f"{self.path}: offset {offset:#x}")

    def _read(self, offset: int, length: int, what: str) -> bytes:
        data = self._read_bytes(offset, length) if offset + length <= self.file_size else b""
        if len(data) != length:
            raise self._error(f"{what} runs past the end of the file ({self.file_size} bytes): "
                              "truncated image", offset)
        return data

    # -- header and section table --------------------------------------------------------------

    def _read_header_and_table(self) -> tuple[tuple[int, int], list[SectionEntry]]:
        start = self._read_bytes(0, len(L.MAGIC))
        if not start:
            raise self._error("the file is empty (truncated, or not a vmstate image)", 0)
        if start != L.MAGIC[:len(start)]:
            raise self._error(f"bad magic {start!r} (expected {L.MAGIC!r}): not a vmstate "
                              "image", 0)
        if self.file_size is None:     # metadata only: take the (checksummed) header's word
            header = self._read_bytes(0, L.HEADER.size)
            self.file_size = (L.HEADER.unpack(header)[7] if len(header) == L.HEADER.size
                              else len(header))
        raw = self._read(0, L.HEADER.size, "header")
        (_, major, minor, header_size, count, flags, table_offset, file_size, table_hash,
         header_hash) = L.HEADER.unpack(raw)
        if major != L.VERSION_MAJOR:
            age = ("newer than" if major > L.VERSION_MAJOR else "older than" if major
                   else "not supported by")
            raise self._error(f"image format version {major}.{minor} is {age} this vmstate "
                              f"(reads {L.VERSION_MAJOR}.x only)", 8)
        if checksum(raw[:L.HEADER_HASHED]) != header_hash:
            raise self._error("header checksum mismatch (the header is corrupt)", 56)
        if file_size != self.file_size:
            problem = "truncated image" if self.file_size < file_size else "trailing bytes"
            raise self._error(f"file is {self.file_size} bytes but its header says {file_size}: "
                              f"{problem}", 32)
        if header_size != L.HEADER.size or table_offset != header_size or count > MAX_SECTIONS \
                or flags:
            raise self._error(f"implausible header (header size {header_size}, table at "
                              f"{table_offset:#x}, {count} sections, flags {flags:#x})", 12)
        table = self._read(table_offset, count * L.SECTION_ENTRY.size, "section table")
        if checksum(table) != table_hash:
            raise self._error("section table checksum mismatch", table_offset)
        entries = [SectionEntry(i, *L.SECTION_ENTRY.unpack_from(table, i * L.SECTION_ENTRY.size))
                   for i in range(count)]
        position = table_offset + len(table)
        for entry in sorted(entries, key=lambda e: e.offset):
            where = table_offset + entry.index * L.SECTION_ENTRY.size
            if (entry.offset < position or entry.offset % L.ALIGN
                    or entry.size > MAX_SECTION_SIZE or entry.offset + entry.size > file_size):
                raise self._error(f"{entry.describe()} has an impossible place ({entry.size} "
                                  f"bytes at {entry.offset:#x}: misaligned, overlapping or out "
                                  "of the file)", where)
            if entry.flags & ~L.SECTION_OPTIONAL:
                raise self._error(f"{entry.describe()} has unknown flags {entry.flags:#x}", where)
            position = entry.offset + entry.size
        return (major, minor), entries

    # -- sections -----------------------------------------------------------------------------

    def _payload(self, entry: SectionEntry) -> bytes:
        data = self._read(entry.offset, entry.size, entry.describe())
        if checksum(data) != entry.hash:
            raise self._error(f"{entry.describe()}: checksum mismatch (the section is corrupt)",
                              entry.offset)
        return data

    def _check_padding(self) -> None:
        """Bytes between the table, the payloads and the memory data are not covered by any
        checksum, so they must be zero: no bit of the file may change unnoticed."""
        spans = sorted((e.offset, e.offset + e.size) for e in self.sections)
        position = L.HEADER.size + L.SECTION_ENTRY.size * len(self.sections)
        data_start = min((d.data_offset for d in self.region_data), default=self.file_size)
        payloads_end = max((end for _, end in spans), default=position)
        if not self.region_data and data_start != payloads_end:
            raise self._error("bytes after the last section of an image without memory",
                              payloads_end)
        for start, end in [*spans, (data_start, data_start)]:
            for chunk in range(position, start, PADDING_CHUNK):
                length = min(PADDING_CHUNK, start - chunk)
                if any(self._read(chunk, length, "padding")):
                    raise self._error("non-zero bytes in padding (the file is corrupt)", chunk)
            position = max(position, end)

    def _decode_sections(self) -> VmState:
        vcpu_parts: dict[int, dict[str, object]] = defaultdict(dict)
        regions: dict[int, tuple[MemoryRegion, RegionData]] = {}
        vmm: dict[str, object] = {}
        extra = []
        for entry in self.sections:
            data = self._payload(entry)
            try:
                if entry.type in codec.VCPU_DECODERS:
                    field, decode = codec.VCPU_DECODERS[entry.type]
                    self._once(vcpu_parts[entry.instance], field, decode(data))
                elif entry.type == L.MEMORY_REGION:
                    self._once(regions, entry.instance, self._decode_region(data))
                elif entry.type in VMM_DECODERS:
                    if entry.instance:
                        raise ValueError("VMM sections have instance 0")
                    field, decode = VMM_DECODERS[_vmm_type(entry)]
                    self._once(vmm, field, decode(data))
                elif entry.flags & L.SECTION_OPTIONAL:
                    extra.append(ExtraSection(entry.type, entry.instance, entry.flags, data))
                else:
                    raise ValueError("unknown mandatory section: written by a newer vmstate?")
            except ValueError as e:
                raise self._error(f"{entry.describe()}: {e}", entry.offset) from None
        state = VmState(vcpus=self._assemble_vcpus(vcpu_parts),
                        memory=self._assemble_regions(regions),
                        vmm=self._assemble_vmm(vmm), extra=tuple(extra))
        found = problems(state)          # the checks join applies before it writes
        if found:
            raise ImageError(f"not a valid VM state: {found[0].message}", self.path)
        return state

    @staticmethod
    def _once(parts: dict, field: str, value) -> None:
        if field in parts:
            raise ValueError("appears twice")
        parts[field] = value

    def _assemble_vcpus(self, parts: dict[int, dict]) -> tuple[VcpuState, ...]:
        if not parts:
            raise self._error("the image holds no vCPU", 0)
        vcpus = []
        for vcpu_id in sorted(parts):
            missing = [L.SECTION_NAMES[t] for t in codec.REQUIRED_VCPU_SECTIONS
                       if codec.VCPU_DECODERS[t][0] not in parts[vcpu_id]]
            if missing:
                raise self._error(f"vCPU {vcpu_id} lacks {', '.join(missing)}", 0)
            vcpus.append(VcpuState(id=vcpu_id, **parts[vcpu_id]))
        return tuple(vcpus)

    def _decode_region(self, data: bytes) -> tuple[MemoryRegion, RegionData]:
        region, data_offset, hashes = codec.decode_region(data)
        if data_offset + region.size > self.file_size:
            raise ValueError(f"region data {data_offset:#x}+{region.size:#x} runs past the end "
                             "of the file")
        return region, RegionData(data_offset, hashes)

    def _assemble_regions(self, regions: dict) -> tuple[MemoryRegion, ...]:
        if sorted(regions) != list(range(len(regions))):
            raise self._error(f"memory regions are numbered {sorted(regions)}, expected 0.."
                              f"{len(regions) - 1}", 0)
        metadata_end = max(entry.offset + entry.size for entry in self.sections)
        expected = L.align(metadata_end, L.PAGE)      # regions follow each other, no gaps
        for i in range(len(regions)):
            region, data = regions[i]
            if data.data_offset != expected:
                raise self._error(f"memory region {i} data at {data.data_offset:#x}, expected "
                                  f"{expected:#x} (right after the previous part)",
                                  data.data_offset)
            expected += L.align(region.size, L.PAGE)
        if regions and expected != self.file_size:
            raise self._error(f"{self.file_size - expected} bytes after the last memory region",
                              expected)
        guest_ranges = sorted((r.guest_phys_addr, r.guest_phys_addr + r.size)
                              for r, _ in regions.values())
        for (_, end), (start, _) in zip(guest_ranges, guest_ranges[1:]):
            if start < end:
                raise self._error(f"memory regions overlap at guest physical {start:#x}", 0)
        self.region_data = [regions[i][1] for i in range(len(regions))]
        return tuple(regions[i][0] for i in range(len(regions)))

    def _assemble_vmm(self, parts: dict) -> VmmState:
        program, argv = parts.pop("program", ("", ()))
        return VmmState(program=program, argv=argv, **parts)

    def _share_runs(self, index: int, share: int, shares: int) -> tuple[range, Runs]:
        """Share `share` of region `index`'s chunks, and its present pages in them."""
        region = self.state.memory[index]
        pages = region.size // PAGE_SIZE
        chunks = share_of_chunks(pages, share, shares)
        return chunks, region.present.runs_in(chunks.start << CHUNK_SHIFT,
                                              chunks.stop << CHUNK_SHIFT)


class Image(ImageMetadata, FdOwner):
    """A checked image file. `state` is the VM state; memory stays in the file."""

    def __init__(self, path: str):
        self.fd = open_to_read(path, "image file", ImageError)
        self._map: mmap.mmap | None = None
        try:
            super().__init__(path, lambda offset, length: os.pread(self.fd, length, offset),
                             os.fstat(self.fd).st_size)
            # Mapped once, here: threads that read memory (split, restore) share the mapping.
            self._map = mmap.mmap(self.fd, self.file_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self._map is not None:
            close_mapping(self._map)
            self._map = None
        super().close()

    def region_view(self, index: int) -> memoryview:
        """Read-only view of one region's bytes in the file (absent pages read as zero)."""
        data = self.region_data[index]
        return memoryview(self._map)[data.data_offset:
                                     data.data_offset + self.state.memory[index].size]

    def read_phys(self, address: int, length: int) -> bytes:
        """Bytes of guest physical memory (absent pages read as zero)."""
        for index, region in enumerate(self.state.memory):
            offset = address - region.guest_phys_addr
            if 0 <= offset and offset + length <= region.size:
                return bytes(self.region_view(index)[offset:offset + length])
        raise ImageError(f"guest physical {address:#x}+{length:#x} is outside guest memory",
                         self.path)

    def _check_holes(self, index: int, chunks: range, runs: Runs) -> None:
        """Pages of region `index` outside the present set were never touched and must read
        as zero (in the pages of `chunks`, whose present pages are `runs`)."""
        region, data = self.state.memory[index], self.region_data[index]
        stray = nonzero_pages_outside(self.fd, data.data_offset, self.region_view(index), runs,
                                      chunks.start << CHUNK_SHIFT,
                                      min(chunks.stop << CHUNK_SHIFT, region.page_count))
        if stray:
            page = stray[0][0]
            raise self._error(f"guest memory {region.guest_phys_addr + page * PAGE_SIZE:#x}: "
                              "a page recorded as never touched holds data (the memory is "
                              "corrupt)", data.data_offset + page * PAGE_SIZE)

    def start_memory_check(self) -> MemoryCheck:
        """verify_memory, started now in a thread or child processes (MemoryCheck): restore
        starts it before the VMM's imports and set-up, which it overlaps."""
        return MemoryCheck(self, MEMORY_CHECK_PROCESSES)

    def verify_memory(self, share: int = 0, shares: int = 1) -> None:
        """Check every chunk checksum, and that absent pages read as zero; ImageError names
        the first bad place. With `shares`, only share `share` of each region's chunks (and
        their absent pages)."""
        for index, (region, data) in enumerate(zip(self.state.memory, self.region_data)):
            chunks, runs = self._share_runs(index, share, shares)
            self._check_holes(index, chunks, runs)
            prefetch_runs(self._map, data.data_offset, runs)
            actual = file_chunk_checksums(self.fd, data.data_offset, self.region_view(index),
                                          runs, region.page_count)
            bad = first_bad_chunk(actual, data.chunk_hashes, chunks)
            if bad is not None:
                first, count = chunk_pages(bad, region.page_count)
                gpa = region.guest_phys_addr + first * PAGE_SIZE
                end = gpa + count * PAGE_SIZE
                raise self._error(f"guest memory {gpa:#x}-{end:#x} fails its checksum (the memory "
                                  "is corrupt)", data.data_offset + first * PAGE_SIZE)


# Child processes a restore verifies memory in. Each gets a core of its own beside the VMM's
# start-up where there is one. xxhash releases the GIL only for large buffers (measured: 1 MiB
# updates ran in parallel in two threads, 4 KiB and 64 KiB ones did not), and a fragmented image
# is read and hashed page by page, so threads would take turns.
MEMORY_CHECK_PROCESSES = 2
# An image storing at most this much memory is checked in one thread instead: its hashing
# holds the GIL for about 3 ms at most, less than forking and reaping the children costs
# (about 15 ms of CPU here: 64 MiB guest, median of 15, 107 -> 92 ms for the whole restore).
MEMORY_CHECK_THREAD_MAX = 64 << 20


class MemoryCheck:
    """Image.verify_memory started at once: in a thread for a small image, else split into
    `processes` shares, each in a child process. result() waits and raises the ImageError
    of the first share that fails (in the order of the shares); close() ends the children
    still running, or waits for the thread (it reads the image, which is closed next)."""

    def __init__(self, image: Image, processes: int):
        stored = sum(region.present_pages for region in image.state.memory) * PAGE_SIZE
        self._children = [] if stored <= MEMORY_CHECK_THREAD_MAX else \
            [ForkedCall(partial(image.verify_memory, share, processes), f"verify-memory-{share}")
             for share in range(processes)]
        self._thread = None if self._children else \
            BackgroundCall(image.verify_memory, "verify-memory")

    def result(self) -> None:
        if self._thread is not None:
            self._thread.result()
        for call in self._children:
            call.result()

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(BaseException):    # its error is result()'s to report
                self._thread.result()
        for call in self._children:
            call.close()


def _vmm_type(entry) -> int:
    """The VMM section `entry` holds: its type, but for an early 2.1 vmm-saved-by."""
    if entry.type == L.EARLY_SAVED_BY and entry.flags & L.SECTION_OPTIONAL:
        return L.VMM_SAVED_BY
    return entry.type


VMM_DECODERS = {
    L.VMM_PROGRAM: ("program", codec.decode_program),
    L.VMM_FILES: ("files", codec.decode_files),
    L.VMM_ADDRESS_SPACE: ("address_space", codec.decode_address_space),
    L.VMM_PENDING_CALL: ("pending", codec.decode_pending),
    L.VMM_OS: ("os", decode_os),
    L.VMM_SAVED_BY: ("saved_by", codec.decode_saved_by),
    L.VMM_LIMITS: ("limits", codec.decode_limits),
    L.VMM_SLEEP_LEFT: ("sleep_left_ns", codec.decode_sleep_left),
}
