"""The guest's file descriptor table: guest fds mapped to open-file descriptions.

Guest fds are the VMM's own numbers, not host fds, so the table can be saved (path, flags,
mode, offset) and rebuilt on another host. Each description owns one host fd, whose offset
and status flags are the description's; dup/dup2/fcntl(F_DUPFD) make more guest fds for the
same description, as on Linux, and it is closed with the last of them. Close-on-exec belongs
to the guest fd. Paths are resolved in the guest's namespace (paths.py).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, replace

from vmstate.errors import RestoreError
from vmstate.rootfs import MODE_BITS, normalize_guest_path, open_beneath, open_root
# DEFAULT_MAX_FDS: --max-fds unless given (vmstate.validate.MAX_GUEST_FDS is the most)
from vmstate.state import DEFAULT_MAX_FDS, FD_FILE, FD_STDERR, FD_STDIN, FD_STDOUT, OpenFile

from .paths import Namespace, builtin_device, error

# Flags that only matter when a file is created; a restore reopens without them.
CREATION_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC
STDIO = {0: (FD_STDIN, 0), 1: (FD_STDOUT, 1), 2: (FD_STDERR, 2)}
STDIO_HOST_FD = {kind: host_fd for kind, host_fd in STDIO.values()}
FD_PIPE = "pipe"         # one end of a pipe the guest made (its bytes live in the host kernel)


@dataclass
class GuestFile:
    """One open-file description."""
    entry: OpenFile
    host_fd: int
    refs: int = 0
    _may_block: bool | None = None

    @property
    def may_block(self) -> bool:
        """A read may wait: a pipe, FIFO, terminal or other device, not a regular file."""
        if self._may_block is None:
            mode = os.fstat(self.host_fd).st_mode
            self._may_block = not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
        return self._may_block

    @property
    def owns_host_fd(self) -> bool:
        return self.entry.kind not in STDIO_HOST_FD


class FileTable:
    def __init__(self, root: str, max_fds: int = DEFAULT_MAX_FDS):
        self.root = root
        try:
            self.root_fd = open_root(root)
        except OSError as e:
            raise RestoreError(f"guest root {root}: {e.strerror}") from None
        self.namespace = Namespace(self.root_fd)
        self.max_fds = max_fds
        self._files: dict[int, GuestFile] = {}
        self._cloexec: set[int] = set()

    @classmethod
    def with_stdio(cls, root: str, max_fds: int = DEFAULT_MAX_FDS) -> FileTable:
        table = cls(root, max_fds)
        for fd, (kind, host_fd) in STDIO.items():
            table.install(GuestFile(OpenFile(fd=fd, kind=kind, flags=os.O_RDWR), host_fd), fd)
        return table

    def close_all(self) -> None:
        for fd in list(self._files):
            self.close(fd)
        os.close(self.root_fd)

    def lowest_free_fd(self, lowest: int = 0) -> int:
        fd = lowest
        while fd in self._files:
            fd += 1
        if fd >= self.max_fds:
            raise error(errno.EMFILE)
        return fd

    def open(self, path: str, flags: int, mode: int) -> int:
        """Open the guest path (absolute, see Namespace.absolute) as a new lowest fd."""
        mode &= MODE_BITS
        return self.adopt(path, self.namespace.open(path, flags, mode), flags, mode)

    def adopt(self, path: str, host_fd: int, flags: int, mode: int) -> int:
        """Give `host_fd`, open on guest path `path`, the lowest free guest fd."""
        try:
            fd = self.lowest_free_fd()
        except OSError:
            os.close(host_fd)
            raise
        return self.install(GuestFile(OpenFile(fd, FD_FILE, self._recorded_path(path, host_fd),
                                               flags, mode, 0), host_fd), fd,
                            cloexec=bool(flags & os.O_CLOEXEC))

    def open_host(self, host_path: str, flags: int, like: OpenFile | None = None) -> int:
        """Open a host file the guest names through /proc/self (its program, one of its own
        fds); recorded as `like`'s path, or the host path's place under the root."""
        host_fd = os.open(host_path, (flags & ~CREATION_FLAGS) | os.O_CLOEXEC)
        path = like.path if like is not None else self.namespace.guest_path(host_fd) or host_path
        try:
            fd = self.lowest_free_fd()
        except OSError:
            os.close(host_fd)
            raise
        entry = OpenFile(fd, like.kind if like is not None else FD_FILE,
                         path.lstrip("/") or ".", flags, 0, 0)
        return self.install(GuestFile(entry, host_fd), fd, cloexec=bool(flags & os.O_CLOEXEC))

    def _recorded_path(self, path: str, host_fd: int) -> str:
        """The path a restore reopens: relative to the root, in normal form."""
        normal = os.path.normpath(path)
        if builtin_device(normal) is not None:
            return normal.lstrip("/")
        guest = self.namespace.guest_path(host_fd)
        return normal.lstrip("/") or "." if guest is None else (guest.lstrip("/") or ".")

    def install(self, guest_file: GuestFile, fd: int, cloexec: bool = False) -> int:
        """Make `fd` (free, below the cap) refer to `guest_file`."""
        guest_file.refs += 1
        self._files[fd] = guest_file
        if cloexec:
            self._cloexec.add(fd)
        else:
            self._cloexec.discard(fd)
        return fd

    def get(self, fd: int) -> GuestFile:
        try:
            return self._files[fd]
        except KeyError:
            raise error(errno.EBADF) from None

    def dup(self, fd: int, lowest: int = 0, cloexec: bool = False) -> int:
        guest_file = self.get(fd)
        if not 0 <= lowest < self.max_fds:
            raise error(errno.EINVAL)
        return self.install(guest_file, self.lowest_free_fd(lowest), cloexec)

    def dup_to(self, fd: int, new_fd: int, cloexec: bool = False) -> int:
        guest_file = self.get(fd)
        if not 0 <= new_fd < self.max_fds:
            raise error(errno.EBADF)
        if new_fd in self._files:
            self.close(new_fd)
        return self.install(guest_file, new_fd, cloexec)

    def is_cloexec(self, fd: int) -> bool:
        self.get(fd)
        return fd in self._cloexec

    def set_cloexec(self, fd: int, cloexec: bool) -> None:
        self.get(fd)
        if cloexec:
            self._cloexec.add(fd)
        else:
            self._cloexec.discard(fd)

    def close(self, fd: int) -> None:
        guest_file = self._files.pop(fd, None)
        if guest_file is None:
            raise error(errno.EBADF)
        self._cloexec.discard(fd)
        guest_file.refs -= 1
        if guest_file.refs == 0 and guest_file.owns_host_fd:
            os.close(guest_file.host_fd)

    def close_range(self, first: int, last: int, cloexec_only: bool = False) -> None:
        for fd in [fd for fd in self._files if first <= fd <= last]:
            if cloexec_only:
                self.set_cloexec(fd, True)
            else:
                self.close(fd)

    def close_on_exec(self) -> None:
        for fd in list(self._cloexec):
            self.close(fd)

    def fds(self) -> list[int]:
        return sorted(self._files)

    def snapshot_entry(self, fd: int) -> OpenFile:
        """Guest fd `fd`'s file table entry, with its description's current offset."""
        guest_file = self._files[fd]
        offset = 0
        if guest_file.owns_host_fd:
            try:
                offset = os.lseek(guest_file.host_fd, 0, os.SEEK_CUR)
            except OSError as e:
                if e.errno != errno.ESPIPE:      # a FIFO or device has no offset
                    raise
        return replace(guest_file.entry, fd=fd, offset=offset)

    @classmethod
    def reopen(cls, root: str, entries: tuple[OpenFile, ...],
               max_fds: int = DEFAULT_MAX_FDS) -> FileTable:
        """Rebuild a saved table: files reopened without creation flags (never truncated)
        and positioned at their saved offsets; stdio bound to this VMM's own streams."""
        table = cls(root, max_fds)
        try:
            for entry in entries:
                table.install(GuestFile(entry, table._reopen_one(entry)), entry.fd)
        except BaseException:
            table.close_all()
            raise
        return table

    def _reopen_one(self, entry: OpenFile) -> int:
        if entry.kind != FD_FILE:
            return STDIO_HOST_FD[entry.kind]
        where = f"guest fd {entry.fd} ({entry.path!r})"
        flags = entry.flags & ~CREATION_FLAGS
        try:
            if normalize_guest_path(entry.path) != entry.path:
                raise OSError(errno.EACCES, "path is not in normal form", entry.path)
            device = builtin_device("/" + entry.path)
            host_fd = (os.open(device, flags | os.O_CLOEXEC) if device is not None
                       else open_beneath(self.root_fd, entry.path, flags, 0))
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
