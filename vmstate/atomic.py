"""Atomic output files: the data has no name until it is complete, and is then renamed over
the target. With O_TMPFILE a killed writer leaves nothing at all behind; where the file
system lacks it, a hidden `.NAME.*.part` file (never a half file under the final name).

Durability is a choice per output. A durable output (the default: a saved or received VM,
the only copy of its state) is fsynced before it gets its name and its directory after, so
once the command returns it survives a crash of the host. A derived output (split's core
and XML, join's image: their inputs are never replaced, so the command can be run again)
is named as soon as it is complete and reaches the disk when the kernel writes it back, as
with cp; a host crash in the next seconds can leave it incomplete (an image then fails its
checksums). `sync FILE` makes one durable."""

from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager

from .errors import UsageError, VmstateError


class PendingFile:
    """A new file in a directory (given by path, or by an open fd with `dir_fd`), invisible
    (or hidden) until `commit(name)` gives it `name` in that directory."""

    def __init__(self, directory: str, prefix: str, mode: int = 0o600, dir_fd: int | None = None):
        self.prefix = prefix
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) \
            if dir_fd is None else os.dup(dir_fd)
        self.temporary: str | None = None
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode,
                              dir_fd=self.dir_fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                os.close(self.dir_fd)
                raise VmstateError(f"cannot create a file in {directory}: {e.strerror}") from None
            self.temporary = self._hidden_name()
            self.fd = os.open(self.temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              mode, dir_fd=self.dir_fd)

    def _hidden_name(self) -> str:
        return f".{self.prefix[:200]}.{os.urandom(4).hex()}.part"

    def commit(self, name: str, durable: bool = True) -> None:
        """Give the data `name` (atomically replacing it); if `durable`, fsync the data
        before and the directory after."""
        if durable:
            os.fsync(self.fd)
        if self.temporary is None:
            self.temporary = self._hidden_name()
            _link_fd(self.fd, self.dir_fd, self.temporary)
        os.rename(self.temporary, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self.temporary = None
        if durable:
            os.fsync(self.dir_fd)
        self.close()

    def discard(self) -> None:
        if self.temporary is not None:
            try:
                os.unlink(self.temporary, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            self.temporary = None
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.dir_fd)
            self.fd = -1


def _identity(path: str):
    """(device, inode) of an existing file; for a name not there yet, its absolute path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def refuse_clobbering(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """UsageError if an output ({role: path}) is the same file as an input or as another
    output: compared by device and inode (any names, links or symlinks), never by name."""
    seen = {_identity(path): (role, path) for role, path in inputs.items()}
    for role, path in outputs.items():
        other = seen.get(_identity(path))
        if other is not None:
            raise UsageError(f"{role} {path} is the same file as {other[0]} {other[1]}: an "
                             "output never replaces an input or another output")
        seen[_identity(path)] = (role, path)


@contextmanager
def atomic_output(path: str, durable: bool = True):
    """Yield a binary file object; on success it becomes `path` (fsynced if `durable`), on
    any error it vanishes."""
    pending = PendingFile(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    f = os.fdopen(os.dup(pending.fd), "w+b")
    try:
        yield f
        f.flush()
        f.close()
        pending.commit(os.path.basename(path), durable)
    except BaseException:
        f.close()
        pending.discard()
        raise


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


def _link_fd(fd: int, dir_fd: int, name: str) -> None:
    """Give an O_TMPFILE file a name: linkat through /proc/self/fd, following that link (what
    an unprivileged process may do; os.link would link the /proc symlink itself)."""
    if _libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), dir_fd, os.fsencode(name),
                    AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
