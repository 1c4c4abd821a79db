"""Write a VM state and its memory as an image file (atomically), or as a stream of pieces.

`plan_image` lays the file out; the memory stays where it is (the guest's own mapping, an
image or a core file) and is written straight from there, page-aligned, with never-touched
pages left as holes. `write_runs` is the one way memory reaches a file, for images and cores
alike: its cost follows the bytes stored, whatever their fragmentation."""

from __future__ import annotations

import errno
import fcntl
import os
from array import array

from ..atomic import atomic_output
from ..chunks import chunk_checksums
from ..errors import VmstateError
from ..fd import pwrite_all
from ..pages import PageSet, Runs
from ..progress import progress_bar
from ..record import record
from ..state import PAGE_SIZE, VmState
from . import codec
from . import layout as L
from .reader import MAX_SECTION_SIZE, checksum

DIRECT_MIN_PAGES = 256       # runs from 1 MiB up bypass the page cache (O_DIRECT)
PROGRESS_STEP = 64 << 20     # bytes of short runs between progress reports


@record
class RegionMemory:
    """One region's memory to store: its bytes (wherever they are) and its present pages,
    which go to file offset `file_offset` + their offset in the region. The pages' runs are
    decoded only when the memory is written (a migration's plan needs only the metadata)."""
    file_offset: int
    view: memoryview
    present: PageSet

    @property
    def runs(self) -> Runs:
        return self.present.runs

    @property
    def present_bytes(self) -> int:
        return self.present.count * PAGE_SIZE


@record
class ImagePlan:
    metadata: bytes                     # header, table, payloads, padding: file bytes 0..len
    regions: tuple[RegionMemory, ...]   # present memory, at page-aligned file offsets
    file_size: int

    @property
    def memory_bytes(self) -> int:
        return sum(r.present_bytes for r in self.regions)


def plan_image(state: VmState, region_views: list[memoryview],
               known_hashes: list[array | None] | None = None) -> ImagePlan:
    """Lay out the whole file and checksum every part. `known_hashes[i]`, where the caller
    has it, is region i's chunk checksums of exactly these bytes (not computed again)."""
    known_hashes = known_hashes or [None] * len(state.memory)
    hashes = [known if known is not None else
              chunk_checksums(view, region.present.runs, region.size // PAGE_SIZE)
              for region, view, known in zip(state.memory, region_views, known_hashes)]

    sections: list[tuple[int, int, int, bytes | None]] = []   # type, flags, instance, payload
    for vcpu in state.vcpus:
        sections += [(kind, 0, vcpu.id, payload) for kind, payload in codec.encode_vcpu(vcpu)]
    region_at = len(sections)
    sections += [(L.MEMORY_REGION, 0, i, None) for i in range(len(state.memory))]
    sections += [(kind, L.SECTION_OPTIONAL if kind in L.OPTIONAL_TYPES else 0, 0, payload)
                 for kind, payload in codec.encode_vmm(state.vmm)]
    sections += [(x.type, x.flags, x.instance, x.data) for x in state.extra]

    for i, region in enumerate(state.memory):
        if codec.region_payload_size(region.size) > MAX_SECTION_SIZE:
            raise VmstateError(f"memory region {i} is too large for one image section "
                               f"({region.size} bytes)")

    offset = L.HEADER.size + L.SECTION_ENTRY.size * len(sections)
    offsets = []
    for _, _, instance, payload in sections:
        offset = L.align(offset)
        offsets.append(offset)
        offset += len(payload) if payload is not None else \
            codec.region_payload_size(state.memory[instance].size)

    data_offset = L.align(offset, L.PAGE)
    regions = []
    for i, region in enumerate(state.memory):
        kind, flags, instance, _ = sections[region_at + i]
        sections[region_at + i] = (kind, flags, instance,
                                   codec.encode_region(region, data_offset, hashes[i]))
        regions.append(RegionMemory(data_offset, region_views[i], region.present))
        data_offset += L.align(region.size, L.PAGE)
    file_size = data_offset if state.memory else offset

    table = b"".join(L.SECTION_ENTRY.pack(kind, flags, instance, at, len(payload),
                                          checksum(payload))
                     for (kind, flags, instance, payload), at in zip(sections, offsets))
    body = bytearray(L.HEADER.size) + table
    for (_, _, _, payload), at in zip(sections, offsets):
        body += bytes(at - len(body)) + payload
    header = L.HEADER.pack(L.MAGIC, L.VERSION_MAJOR, L.VERSION_MINOR, L.HEADER.size,
                           len(sections), 0, L.HEADER.size, file_size, checksum(table), 0)
    header = header[:L.HEADER_HASHED] + checksum(header[:L.HEADER_HASHED]).to_bytes(8, "little")
    body[:L.HEADER.size] = header
    if state.memory:            # the metadata runs up to the first byte of guest memory
        body += bytes(L.align(len(body), L.PAGE) - len(body))
    return ImagePlan(bytes(body), tuple(regions), file_size)


def with_chunk_hashes(metadata: bytes, chunk_hashes: list[array]) -> bytes:
    """Image metadata (a checked one, or plan_image's) with region i's chunk checksums
    replaced by chunk_hashes[i], and the checksums over them (its section's, the table's,
    the header's) computed again; nothing else is re-encoded, so it costs the same whatever
    the memory's layout."""
    body = bytearray(metadata)
    fields = list(L.HEADER.unpack_from(body))
    count, table = fields[4], fields[6]
    for i in range(count):
        at = table + i * L.SECTION_ENTRY.size
        kind, flags, instance, offset, size, _ = L.SECTION_ENTRY.unpack_from(body, at)
        if kind != L.MEMORY_REGION:
            continue
        hashes = chunk_hashes[instance].tobytes()
        body[offset + size - len(hashes):offset + size] = hashes
        L.SECTION_ENTRY.pack_into(body, at, kind, flags, instance, offset, size,
                                  checksum(body[offset:offset + size]))
    fields[8] = checksum(body[table:table + count * L.SECTION_ENTRY.size])
    header = L.HEADER.pack(*fields)
    body[:L.HEADER.size] = header[:L.HEADER_HASHED] + \
        checksum(header[:L.HEADER_HASHED]).to_bytes(8, "little")
    return bytes(body)


def write_runs(fd: int, regions, progress=None) -> None:
    """Write the present pages of each RegionMemory at its place in the file, leaving holes
    for the others. Short runs go through the page cache, one pwrite each (with O_DIRECT a
    4 KiB write costs 100 us here, buffered a few); runs of DIRECT_MIN_PAGES and more go
    around it with O_DIRECT where the file system allows it (no page allocation, nothing
    left to flush at fsync), falling back to buffered writes."""
    long_runs, unreported = [], 0
    for region in regions:
        view, base = region.view, region.file_offset
        for first, count in region.runs:
            start, length = first * PAGE_SIZE, count * PAGE_SIZE
            if count >= DIRECT_MIN_PAGES:
                long_runs.append((base + start, view[start:start + length]))
                continue
            if os.pwrite(fd, view[start:start + length], base + start) != length:
                pwrite_all(fd, view[start:start + length], base + start)
            unreported += length
            if progress is not None and unreported >= PROGRESS_STEP:
                progress(unreported)
                unreported = 0
    if progress is not None and unreported:
        progress(unreported)
    _write_direct(fd, long_runs, progress)


def _write_direct(fd: int, pieces, progress) -> None:
    if not pieces:
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        pass
    try:
        for file_offset, data in pieces:
            try:
                pwrite_all(fd, data, file_offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)     # this source or file refuses O_DIRECT
                pwrite_all(fd, data, file_offset)
            if progress is not None:
                progress(len(data))
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def write_image(path: str, state: VmState, region_views: list[memoryview],
                known_hashes: list[array | None] | None = None,
                durable: bool = True) -> ImagePlan:
    """Write the image atomically (temporary file, fsync if `durable`, rename); returns its
    plan."""
    plan = plan_image(state, region_views, known_hashes)
    try:
        with atomic_output(path, durable) as f, progress_bar(f"writing {path}",
                                                    plan.memory_bytes) as advance:
            f.truncate(plan.file_size)
            pwrite_all(f.fileno(), plan.metadata, 0)
            write_runs(f.fileno(), plan.regions, advance)
    except OSError as e:
        raise VmstateError(f"cannot write {path}: {e.strerror}") from None
    return plan
