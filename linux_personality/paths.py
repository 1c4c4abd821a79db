"""The guest's file namespace: the --root directory is its `/`, as in a chroot.

Every path is resolved by the host kernel with openat2(RESOLVE_IN_ROOT) from the root's
descriptor: absolute paths start at the root, `..` at the top stays at the top and symlinks
are resolved inside it, with no window between a check and the use. A relative path is the
current directory's (or a directory descriptor's) guest path joined with it, resolved the same
way. Calls that name the last component themselves (mkdir, unlink, rename, symlink, readlink,
lstat) resolve the parent directory and then act on the name relative to it.

A few files are built in whatever the root holds: /dev/null, /dev/zero, /dev/urandom,
/dev/random, /dev/tty (when the VMM's stdin is a terminal), /proc/self/exe, /proc/self/fd/N.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath

from vmstate.rootfs import RESOLVE_IN_ROOT, openat2

PATH_MAX = 4096
HOST_DEVICES = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}
PROC_SELF_FD = "/proc/self/fd/"
PROC_SELF_EXE = "/proc/self/exe"


def error(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(root_fd, path, RESOLVE_IN_ROOT): a host fd (close-on-exec), or OSError."""
    return openat2(root_fd, path, flags, mode, RESOLVE_IN_ROOT)


def builtin_device(path: str) -> str | None:
    """The host path of a built-in device named by the normalized guest path, if it is one."""
    if path in HOST_DEVICES:
        return path
    if path == "/dev/tty" and os.isatty(0):
        return path
    return None


class Namespace:
    """The root, the current directory and the umask of one guest."""

    def __init__(self, root_fd: int, cwd: str = "/", umask: int = 0o022):
        self.root_fd = root_fd
        self.root_real = os.readlink(f"/proc/self/fd/{root_fd}")
        self.cwd = cwd
        self.umask = umask

    def absolute(self, path: str, base: str | None = None) -> str:
        """The guest path `path` names, relative to `base` (default the cwd); not normalized
        (the kernel resolves `..` after symlinks, as Linux does)."""
        if not path:
            raise error(errno.ENOENT)
        if len(path) >= PATH_MAX:
            raise error(errno.ENAMETOOLONG)
        if path.startswith("/"):
            return path
        base = self.cwd if base is None else base
        return base.rstrip("/") + "/" + path

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """A host fd for the guest path (absolute, from `absolute`)."""
        normal = posixpath.normpath(path)
        device = builtin_device(normal)
        if device is not None:
            return os.open(device, (flags & ~(os.O_CREAT | os.O_EXCL | os.O_DIRECTORY))
                           | os.O_CLOEXEC)
        if not flags & os.O_CREAT:
            return open_in_root(self.root_fd, path, flags)
        with self.creating():
            return open_in_root(self.root_fd, path, flags, mode)

    @contextlib.contextmanager
    def creating(self):
        """Files and directories made here get the guest's umask instead of the VMM's."""
        host_umask = os.umask(self.umask)
        try:
            yield
        finally:
            os.umask(host_umask)

    def enter(self, path: str) -> None:
        """Make the directory at guest path `path` the current directory."""
        host_fd = self.open(self.absolute(path), os.O_PATH | os.O_DIRECTORY)
        try:
            self.cwd = self.guest_path(host_fd) or "/"
        finally:
            os.close(host_fd)

    def host_path(self, guest_path: str) -> str:
        """Where a guest file lives on the host (the root's real path joined with its guest
        path), for the program name /proc/self/exe shows."""
        host_fd = self.open(guest_path, os.O_PATH)
        try:
            return os.readlink(f"/proc/self/fd/{host_fd}")
        finally:
            os.close(host_fd)

    def guest_path(self, host_fd: int) -> str | None:
        """The guest path of an open host fd, or None if it lies outside the root."""
        return self.guest_path_of(os.readlink(f"/proc/self/fd/{host_fd}"))

    def guest_path_of(self, real: str) -> str | None:
        """The guest path of the absolute host path `real` (compared as text, nothing
        followed), or None if it does not lie under the root."""
        if real == self.root_real:
            return "/"
        prefix = self.root_real.rstrip("/") + "/"
        if real.startswith(prefix) and not real.endswith(" (deleted)"):
            return "/" + real[len(prefix):]
        return None

    @contextlib.contextmanager
    def followed(self, path: str):
        """A host path naming what the guest path names, a final symlink followed inside the
        root: for calls whose host form would follow it from the host's own / (chown,
        utimensat, linkat). It is /proc/self/fd/N of an O_PATH fd opened with
        RESOLVE_IN_ROOT, valid inside the block; the host call follows that magic link to the
        file already resolved. (Without following, `at` is safe: the host does not follow.)"""
        host_fd = self.open(path, os.O_PATH)
        try:
            yield f"/proc/self/fd/{host_fd}"
        finally:
            os.close(host_fd)

    @contextlib.contextmanager
    def at(self, path: str):
        """(host directory fd, name) for a call that acts on the last component itself
        (mkdirat, unlinkat, renameat, ...). A path ending in "." or ".." (or "/") gives the
        directory it names and "." (the host call then fails as Linux does: EEXIST, EINVAL)."""
        head, _, name = path.rstrip("/").rpartition("/")
        if name in ("", ".", ".."):
            dir_fd, name = open_in_root(self.root_fd, path, os.O_PATH | os.O_DIRECTORY), "."
        else:
            dir_fd = open_in_root(self.root_fd, head or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)
