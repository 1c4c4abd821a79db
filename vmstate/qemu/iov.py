"""Gathered writes: many buffers (page records, pages) to a file in one system call each
batch, the kernel copying straight from the mapped source."""

from __future__ import annotations

import os

IOV_MAX = os.sysconf("SC_IOV_MAX")


def write_gathered(fd: int, buffers: list, offset: int | None = None) -> None:
    """Write all `buffers` in order, at `offset` (pwritev) or the file position (writev),
    IOV_MAX at a time; a short write continues where it stopped."""
    for start in range(0, len(buffers), IOV_MAX):
        batch = buffers[start:start + IOV_MAX]
        while batch:
            written = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset)
            if offset is not None:
                offset += written
            if written == sum(len(memoryview(b).cast("B")) for b in batch):
                break
            batch = _after(batch, written)


def _after(batch: list, written: int) -> list:
    """What remains of `batch` once `written` bytes of it are out (the rare short write)."""
    for index, buffer in enumerate(batch):
        size = len(memoryview(buffer).cast("B"))
        if written < size:
            return [memoryview(buffer).cast("B")[written:], *batch[index + 1:]]
        written -= size
    return []
