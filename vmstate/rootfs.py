"""Files beneath a root directory that a guest (or a network peer) names by path.

openat2(RESOLVE_BENEATH) makes the kernel itself refuse `..`, absolute paths and symlinks
that would leave the root, with no window between a check and the open."""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath

SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_BENEATH, RESOLVE_IN_ROOT = 0x02, 0x08, 0x10
MODE_BITS = 0o777     # set-uid, set-gid and sticky bits from a guest or a peer are never applied


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def open_root(root: str) -> int:
    """An O_PATH descriptor of the directory that guest paths are resolved beneath."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2) with RESOLVE_NO_MAGICLINKS added: a host fd (close-on-exec), or OSError."""
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0,
                   resolve | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_openat2, dir_fd, os.fsencode(path), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_beneath(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(root_fd, path, RESOLVE_BENEATH): a host fd, or OSError (EACCES on escape)."""
    try:
        return openat2(root_fd, path, flags, mode, RESOLVE_BENEATH)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path) from None
        raise


def normalize_guest_path(path: str) -> str:
    """The path relative to the root with `.`/`..` folded; OSError(EACCES) for a path that
    is absolute or climbs out of the root."""
    if path.startswith("/"):
        raise OSError(errno.EACCES, "absolute paths are outside the guest root", path)
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise OSError(errno.EACCES, "path leaves the guest root", path)
    return normal


def open_directory_beneath(root_fd: int, path: str, create: bool) -> int:
    """The directory `path` below the root (made, one component at a time, if `create`), open
    for reading, so that it can be fsynced and used as a dir_fd."""
    fd = open_beneath(root_fd, ".", os.O_RDONLY | os.O_DIRECTORY)
    for part in [p for p in path.split("/") if p]:
        try:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            child = open_beneath(fd, part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        finally:
            os.close(fd)
        fd = child
    return fd
