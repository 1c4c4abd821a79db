"""Atomic output files: the data has no name until it is complete, fsynced, and renamed over
the target. With O_TMPFILE a killed writer leaves nothing at all behind; where the file
system lacks it, a hidden `.NAME.*.part` file (never a half file under the final name)."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import tempfile
from contextlib import contextmanager

from .errors import VmstateError


class PendingFile:
    """A new file in `directory`, invisible (or hidden) until `commit(name)`."""

    def __init__(self, directory: str, prefix: str):
        self.directory, self.prefix = directory, prefix
        self.temporary: str | None = None
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise VmstateError(f"cannot create a file in {directory}: {e.strerror}") from None
            self.fd, self.temporary = tempfile.mkstemp(prefix=f".{prefix}.", suffix=".part",
                                                       dir=directory)

    def commit(self, path: str) -> None:
        """fsync, give the data the name `path` (atomically replacing it), fsync the directory."""
        os.fsync(self.fd)
        if self.temporary is None:
            self.temporary = os.path.join(self.directory,
                                          f".{self.prefix}.{secrets.token_hex(4)}.part")
            _link_fd(self.fd, self.temporary)
        os.rename(self.temporary, path)
        self.temporary = None
        fsync_directory(self.directory)
        self.close()

    def discard(self) -> None:
        if self.temporary is not None:
            try:
                os.unlink(self.temporary)
            except FileNotFoundError:
                pass
            self.temporary = None
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def atomic_output(path: str):
    """Yield a binary file object; on success it becomes `path`, on any error it vanishes."""
    pending = PendingFile(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    f = os.fdopen(os.dup(pending.fd), "w+b")
    try:
        yield f
        f.flush()
        f.close()
        pending.commit(path)
    except BaseException:
        f.close()
        pending.discard()
        raise


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


def _link_fd(fd: int, path: str) -> None:
    """Give an O_TMPFILE file a name: linkat through /proc/self/fd, following that link (what
    an unprivileged process may do; os.link would link the /proc symlink itself)."""
    if _libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(path),
                    AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
