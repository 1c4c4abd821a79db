"""The VMM's file table: guest file descriptors mapped to host files under the guest root.

Guest fds are the VMM's own numbers, not host fds, so the table can be saved (path, flags,
mode, offset) and rebuilt on another host. Paths are resolved with openat2(RESOLVE_BENEATH)
relative to the root directory: the kernel itself refuses `..`, absolute paths and symlinks
that would leave it, with no window between a check and the open.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace

from vmstate.errors import RestoreError
from vmstate.rootfs import MODE_BITS, normalize_guest_path, open_beneath, open_root
from vmstate.validate import MAX_GUEST_FDS
from vmstate.state import FD_FILE, FD_STDERR, FD_STDIN, FD_STDOUT, OpenFile

# Flags that only matter when a file is created; a restore reopens without them.
CREATION_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC
STDIO = {0: (FD_STDIN, 0), 1: (FD_STDOUT, 1), 2: (FD_STDERR, 2)}
STDIO_HOST_FD = {kind: host_fd for kind, host_fd in STDIO.values()}


@dataclass
class GuestFile:
    entry: OpenFile
    host_fd: int

    @property
    def owns_host_fd(self) -> bool:
        return self.entry.kind == FD_FILE


class FileTable:
    def __init__(self, root: str):
        self.root = root
        try:
            self.root_fd = open_root(root)
        except OSError as e:
            raise RestoreError(f"guest root {root}: {e.strerror}") from None
        self._files: dict[int, GuestFile] = {}

    @classmethod
    def with_stdio(cls, root: str) -> FileTable:
        table = cls(root)
        for fd, (kind, host_fd) in STDIO.items():
            table._files[fd] = GuestFile(OpenFile(fd=fd, kind=kind, flags=os.O_RDWR), host_fd)
        return table

    def close_all(self) -> None:
        for fd in list(self._files):
            self.close(fd)
        os.close(self.root_fd)

    def _lowest_free_fd(self) -> int:
        fd = 0
        while fd in self._files:
            fd += 1
        if fd >= MAX_GUEST_FDS:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return fd

    def open(self, path: str, flags: int, mode: int) -> int:
        if not path:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        recorded = normalize_guest_path(path)
        mode &= MODE_BITS
        host_fd = open_beneath(self.root_fd, recorded, flags, mode)
        try:
            fd = self._lowest_free_fd()
        except OSError:
            os.close(host_fd)
            raise
        self._files[fd] = GuestFile(OpenFile(fd, FD_FILE, recorded, flags, mode, 0), host_fd)
        return fd

    def get(self, fd: int) -> GuestFile:
        try:
            return self._files[fd]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def close(self, fd: int) -> None:
        guest_file = self._files.pop(fd, None)
        if guest_file is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if guest_file.owns_host_fd:
            os.close(guest_file.host_fd)

    def snapshot(self) -> tuple[OpenFile, ...]:
        """The table as plain data, with each file's current offset."""
        entries = []
        for fd in sorted(self._files):
            guest_file = self._files[fd]
            offset = 0
            if guest_file.owns_host_fd:
                try:
                    offset = os.lseek(guest_file.host_fd, 0, os.SEEK_CUR)
                except OSError as e:
                    if e.errno != errno.ESPIPE:      # a FIFO under the root has no offset
                        raise
            entries.append(replace(guest_file.entry, offset=offset))
        return tuple(entries)

    @classmethod
    def reopen(cls, root: str, entries: tuple[OpenFile, ...]) -> FileTable:
        """Rebuild a saved table: files reopened without creation flags (never truncated)
        and positioned at their saved offsets; stdio bound to this VMM's own streams."""
        table = cls(root)
        try:
            for entry in entries:
                table._files[entry.fd] = GuestFile(entry, table._reopen_one(entry))
        except BaseException:
            table.close_all()
            raise
        return table

    def _reopen_one(self, entry: OpenFile) -> int:
        if entry.kind != FD_FILE:
            return STDIO_HOST_FD[entry.kind]
        where = f"guest fd {entry.fd} ({entry.path!r})"
        try:
            if normalize_guest_path(entry.path) != entry.path:
                raise OSError(errno.EACCES, "path is not in normal form", entry.path)
            host_fd = open_beneath(self.root_fd, entry.path, entry.flags & ~CREATION_FLAGS, 0)
        except OSError as e:
            reason = ("path is outside the guest root" if e.errno == errno.EACCES
                      else f"cannot be reopened: {e.strerror}")
            raise RestoreError(f"{where}: {reason} (root {self.root})") from None
        try:
            os.lseek(host_fd, entry.offset, os.SEEK_SET)
        except (OSError, OverflowError) as e:
            if isinstance(e, OSError) and e.errno == errno.ESPIPE and entry.offset == 0:
                return host_fd                   # a FIFO: there is nothing to seek
            os.close(host_fd)
            raise RestoreError(f"{where}: cannot seek to offset {entry.offset}") from None
        return host_fd
