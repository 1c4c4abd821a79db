"""Write a VM state and its memory as an image file (atomically), or as a stream of pieces.

`plan_image` lays the file out; the memory stays where it is (the guest's own mapping, an
image or a core file) and is written straight from there, page-aligned, with never-touched
pages left as holes."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from ..atomic import atomic_output
from ..errors import VmstateError
from ..pages import split_runs
from ..progress import progress_bar
from ..state import PAGE_SIZE, VmState
from . import codec
from . import layout as L
from .reader import MAX_SECTION_SIZE, checksum, checksums

MAX_WRITE = 1 << 30          # Linux writes at most ~2 GiB per call; keep calls well below


@dataclass(frozen=True)
class MemoryPiece:
    file_offset: int
    data: memoryview


@dataclass(frozen=True)
class ImagePlan:
    metadata: bytes                 # header, table, payloads, padding: file bytes 0..len
    pieces: tuple[MemoryPiece, ...]  # present memory, at page-aligned file offsets
    file_size: int

    @property
    def memory_bytes(self) -> int:
        return sum(len(p.data) for p in self.pieces)


def _extent_views(state: VmState, region_views) -> list[list[tuple[int, int, memoryview]]]:
    per_region = []
    for region, view in zip(state.memory, region_views):
        runs = split_runs(region.present, L.MAX_EXTENT_PAGES)
        per_region.append([(first, count, view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
                           for first, count in runs])
    return per_region


def plan_image(state: VmState, region_views: list[memoryview]) -> ImagePlan:
    """Lay out the whole file and checksum every part (memory checksums in parallel)."""
    extents = _extent_views(state, region_views)
    hashes = [checksums(e[2] for e in region) for region in extents]

    sections: list[tuple[int, int, int, bytes | None]] = []   # type, flags, instance, payload
    for vcpu in state.vcpus:
        sections += [(kind, 0, vcpu.id, payload) for kind, payload in codec.encode_vcpu(vcpu)]
    region_at = len(sections)
    sections += [(L.MEMORY_REGION, 0, i, None) for i in range(len(state.memory))]
    sections += [(kind, 0, 0, payload) for kind, payload in codec.encode_vmm(state.vmm)]
    sections += [(x.type, x.flags, x.instance, x.data) for x in state.extra]

    def region_size(i: int) -> int:
        return L.REGION.size + L.EXTENT.size * len(extents[i])

    for i in range(len(state.memory)):
        if region_size(i) > MAX_SECTION_SIZE:
            raise VmstateError(f"memory region {i} is too fragmented for one image section "
                               f"({len(extents[i])} runs of pages)")

    offset = L.HEADER.size + L.SECTION_ENTRY.size * len(sections)
    offsets = []
    for _, _, instance, payload in sections:
        offset = L.align(offset)
        offsets.append(offset)
        offset += len(payload) if payload is not None else region_size(instance)

    data_offset = L.align(offset, L.PAGE)
    pieces = []
    for i, region in enumerate(state.memory):
        payload = L.REGION.pack(region.guest_phys_addr, region.size, data_offset,
                                len(extents[i]))
        for (first, count, view), digest in zip(extents[i], hashes[i]):
            payload += L.EXTENT.pack(first, count, digest)
            pieces.append(MemoryPiece(data_offset + first * PAGE_SIZE, view))
        kind, flags, instance, _ = sections[region_at + i]
        sections[region_at + i] = (kind, flags, instance, payload)
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
    return ImagePlan(bytes(body), tuple(pieces), file_size)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view[:MAX_WRITE], offset)
        view, offset = view[written:], offset + written


def write_memory(fd: int, pieces, progress=None) -> None:
    """Write memory pieces with O_DIRECT where the file system allows it: they are page
    aligned in the file and in memory, and going around the page cache is both faster here
    (no page allocation) and leaves nothing to flush at fsync. Falls back to buffered I/O."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        pass
    for piece in pieces:
        try:
            pwrite_all(fd, piece.data, piece.file_offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)     # this source or file refuses O_DIRECT
            pwrite_all(fd, piece.data, piece.file_offset)
        if progress is not None:
            progress(len(piece.data))
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def write_image(path: str, state: VmState, region_views: list[memoryview]) -> ImagePlan:
    """Write the image atomically (temporary file, fsync, rename); returns its plan."""
    plan = plan_image(state, region_views)
    try:
        with atomic_output(path) as f, progress_bar(f"writing {path}",
                                                    plan.memory_bytes) as advance:
            f.truncate(plan.file_size)
            pwrite_all(f.fileno(), plan.metadata, 0)
            write_memory(f.fileno(), plan.pieces, advance)
    except OSError as e:
        raise VmstateError(f"cannot write {path}: {e.strerror}") from None
    return plan
