"""Directory system calls: listing, making and removing names, links, the current directory."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from .paths import PATH_MAX, PROC_SELF_EXE, PROC_SELF_FD, error
from .table import signed32, syscall
from .trace import AT_FDCWD

AT_REMOVEDIR, AT_SYMLINK_FOLLOW = 0x200, 0x400
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
SYS_getdents64, SYS_renameat2 = 217, 316
GETDENTS_MAX = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _checked(result: int) -> int:
    if result < 0:
        raise error(ctypes.get_errno())
    return result


@syscall(217, "getdents64", "fd ptr size")
def sys_getdents64(k, fd, buf, count):
    """The host's entries (linux_dirent64 is the same on both sides), straight into the
    guest's buffer; the directory's position is the host fd's, so it is saved with it."""
    host_fd = k.host_fd(fd)
    count = min(count & 0xFFFFFFFF, GETDENTS_MAX)
    k.memory.check(buf, count)
    staging = ctypes.create_string_buffer(count)
    n = _checked(_libc.syscall(SYS_getdents64, host_fd, staging, count))
    k.memory.write(buf, staging.raw[:n])
    return n


@syscall(83, "mkdir", "path mode")
def sys_mkdir(k, path, mode):
    return sys_mkdirat(k, AT_FDCWD, path, mode)


@syscall(258, "mkdirat", "dirfd path mode")
def sys_mkdirat(k, dirfd, path, mode):
    with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name), k.namespace.creating():
        os.mkdir(name, mode & 0o777, dir_fd=dir_fd)
    return 0


@syscall(133, "mknod", "path mode int")
def sys_mknod(k, path, mode, dev):
    return sys_mknodat(k, AT_FDCWD, path, mode, dev)


@syscall(259, "mknodat", "dirfd path mode int")
def sys_mknodat(k, dirfd, path, mode, dev):
    """Regular files and FIFOs only: a guest makes no device nodes on the host."""
    kind = stat.S_IFMT(mode) or stat.S_IFREG
    if kind not in (stat.S_IFREG, stat.S_IFIFO):
        raise error(errno.EPERM)
    with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name), k.namespace.creating():
        os.mknod(name, kind | (mode & 0o777), dir_fd=dir_fd)
    return 0


@syscall(87, "unlink", "path")
def sys_unlink(k, path):
    return sys_unlinkat(k, AT_FDCWD, path, 0)


@syscall(84, "rmdir", "path")
def sys_rmdir(k, path):
    return sys_unlinkat(k, AT_FDCWD, path, AT_REMOVEDIR)


@syscall(263, "unlinkat", "dirfd path hex")
def sys_unlinkat(k, dirfd, path, flags):
    if flags & ~AT_REMOVEDIR:
        raise error(errno.EINVAL)
    with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name):
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    return 0


@syscall(82, "rename", "path path")
def sys_rename(k, old, new):
    return sys_renameat2(k, AT_FDCWD, old, AT_FDCWD, new, 0)


@syscall(264, "renameat", "dirfd path dirfd path")
def sys_renameat(k, old_dirfd, old, new_dirfd, new):
    return sys_renameat2(k, old_dirfd, old, new_dirfd, new, 0)


@syscall(316, "renameat2", "dirfd path dirfd path hex")
def sys_renameat2(k, old_dirfd, old, new_dirfd, new, flags):
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise error(errno.EINVAL)
    with k.namespace.at(k.resolve(old_dirfd, old)) as (old_fd, old_name), \
            k.namespace.at(k.resolve(new_dirfd, new)) as (new_fd, new_name):
        _checked(_libc.syscall(SYS_renameat2, old_fd, os.fsencode(old_name), new_fd,
                               os.fsencode(new_name), flags & 0xFFFFFFFF))
    return 0


@syscall(86, "link", "path path")
def sys_link(k, old, new):
    return sys_linkat(k, AT_FDCWD, old, AT_FDCWD, new, 0)


@syscall(265, "linkat", "dirfd path dirfd path hex")
def sys_linkat(k, old_dirfd, old, new_dirfd, new, flags):
    """With AT_SYMLINK_FOLLOW the old path's final symlink is followed inside the root (the
    host link then goes through /proc/self/fd, which names the resolved file)."""
    with k.namespace.at(k.resolve(new_dirfd, new)) as (new_fd, new_name):
        if flags & AT_SYMLINK_FOLLOW:
            with k.namespace.followed(k.resolve(old_dirfd, old)) as old_path:
                os.link(old_path, new_name, dst_dir_fd=new_fd, follow_symlinks=True)
        else:
            with k.namespace.at(k.resolve(old_dirfd, old)) as (old_fd, old_name):
                os.link(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd,
                        follow_symlinks=False)
    return 0


@syscall(88, "symlink", "path path")
def sys_symlink(k, target, path):
    return sys_symlinkat(k, target, AT_FDCWD, path)


@syscall(266, "symlinkat", "path dirfd path")
def sys_symlinkat(k, target, dirfd, path):
    """The target is stored as given: it is resolved in the guest's root when followed."""
    target_text = k.path(target)
    if not target_text:
        raise error(errno.ENOENT)
    with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name):
        os.symlink(target_text, name, dir_fd=dir_fd)
    return 0


@syscall(89, "readlink", "path ptr size")
def sys_readlink(k, path, buf, size):
    return sys_readlinkat(k, AT_FDCWD, path, buf, size)


@syscall(267, "readlinkat", "dirfd path ptr size")
def sys_readlinkat(k, dirfd, path, buf, size):
    size = signed32(size)
    if size <= 0:
        raise error(errno.EINVAL)
    guest_path = k.resolve(dirfd, path)
    if guest_path == PROC_SELF_EXE:
        target = k.program_guest_path()
    elif guest_path.startswith(PROC_SELF_FD) and guest_path[len(PROC_SELF_FD):].isdigit():
        target = k.fd_guest_path(int(guest_path[len(PROC_SELF_FD):]))
    else:
        with k.namespace.at(guest_path) as (dir_fd, name):
            target = os.readlink(name, dir_fd=dir_fd)
    data = os.fsencode(target)[:size]
    k.memory.write(buf, data)
    return len(data)


@syscall(80, "chdir", "path")
def sys_chdir(k, path):
    host_fd = k.namespace.open(k.resolve(AT_FDCWD, path), os.O_PATH | os.O_DIRECTORY)
    try:
        _enter(k, host_fd)
    finally:
        os.close(host_fd)
    return 0


@syscall(81, "fchdir", "fd")
def sys_fchdir(k, fd):
    _enter(k, k.host_fd(fd))
    return 0


def _enter(k, host_fd: int) -> None:
    if not stat.S_ISDIR(os.fstat(host_fd).st_mode):
        raise error(errno.ENOTDIR)
    guest = k.namespace.guest_path(host_fd)
    if guest is None:
        raise error(errno.ENOENT)
    if not os.access(f"/proc/self/fd/{host_fd}", os.X_OK):
        raise error(errno.EACCES)
    k.namespace.cwd = guest


@syscall(79, "getcwd", "ptr size")
def sys_getcwd(k, buf, size):
    data = os.fsencode(k.namespace.cwd) + b"\0"
    if len(data) > PATH_MAX:
        raise error(errno.ENAMETOOLONG)
    if size < len(data):
        raise error(errno.ERANGE)
    k.memory.write(buf, data)
    return len(data)


@syscall(95, "umask", "mode")
def sys_umask(k, mask):
    old, k.namespace.umask = k.namespace.umask, mask & 0o777
    return old
