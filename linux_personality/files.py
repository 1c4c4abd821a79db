"""File system calls: open, read, write, seek, stat, truncate, sync, copy, access, attributes."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
import threading

from .paths import PROC_SELF_EXE, PROC_SELF_FD, error
from .stops import CallInterrupted
from .table import signed32, signed64, syscall
from .trace import AT_FDCWD

AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR, AT_EACCESS, AT_EMPTY_PATH = 0x100, 0x200, 0x200, 0x1000
HOST_AT_FDCWD = -100             # the VMM's own cwd: only absolute host paths are passed with it
MAX_IO = 0x7FFFF000          # Linux caps one read or write at this many bytes
STATX = struct.Struct("<IIQIIIHxxQQQQ" + "qIi" * 4 + "IIII112x")
STATX_BASIC_STATS = 0x7FF
TIMESPEC_PAIR = struct.Struct("<qqqq")
_libc = ctypes.CDLL(None, use_errno=True)


def _guest_buffer(k, buf: int, count: int) -> memoryview:
    """The guest's buffer for a read or write of `count` bytes. Like Linux, a count past the
    end of a valid buffer is clipped (the call then moves what is there), not an EFAULT."""
    count = min(count, MAX_IO)
    k.memory.check(buf, 1 if count else 0)
    return k.memory.user_view(buf, max(0, min(count, k.memory.user_end - buf)))


@syscall(0, "read", "fd out size")
def sys_read(k, fd, buf, count):
    view = _guest_buffer(k, buf, count)
    k.wait_readable(fd)
    n = os.readv(k.host_fd(fd), [view])
    k.memory.mark_written(buf, n)
    return n


@syscall(1, "write", "fd in size")
def sys_write(k, fd, buf, count):
    host_fd = k.host_fd(fd)
    view = _guest_buffer(k, buf, count)
    return os.write(host_fd, k.limit_file_size(host_fd, view))


@syscall(17, "pread64", "fd out size off")
def sys_pread64(k, fd, buf, count, offset):
    n = os.preadv(k.host_fd(fd), [_guest_buffer(k, buf, count)], signed64(offset))
    k.memory.mark_written(buf, n)
    return n


@syscall(18, "pwrite64", "fd in size off")
def sys_pwrite64(k, fd, buf, count, offset):
    host_fd = k.host_fd(fd)
    data = k.limit_file_size(host_fd, _guest_buffer(k, buf, count), signed64(offset))
    return os.pwrite(host_fd, data, signed64(offset))


@syscall(19, "readv", "fd iov_out int")
def sys_readv(k, fd, iov, count):
    views = k.iovecs(iov, count, writable=True)
    k.wait_readable(fd)
    return os.readv(k.host_fd(fd), views)


@syscall(20, "writev", "fd iov_in int")
def sys_writev(k, fd, iov, count):
    host_fd = k.host_fd(fd)
    views = k.iovecs(iov, count, writable=False)
    if k.max_file_size is not None:
        views = _first_bytes(views, k.file_size_room(host_fd, sum(len(v) for v in views)))
    return os.writev(host_fd, views)


def _first_bytes(views: list[memoryview], count: int) -> list[memoryview]:
    """The first `count` bytes of the buffers, as views (nothing copied)."""
    kept = []
    for view in views:
        if count <= 0:
            break
        kept.append(view[:count])
        count -= len(kept[-1])
    return kept


@syscall(2, "open", "path oflags mode")
def sys_open(k, path, flags, mode):
    return sys_openat(k, AT_FDCWD, path, flags, mode)


@syscall(85, "creat", "path mode")
def sys_creat(k, path, mode):
    return sys_openat(k, AT_FDCWD, path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)


@syscall(257, "openat", "dirfd path oflags mode")
def sys_openat(k, dirfd, path, flags, mode):
    flags &= 0xFFFFFFFF
    guest_path = k.resolve(dirfd, path)
    if guest_path.startswith(PROC_SELF_FD):
        return _reopen_guest_fd(k, guest_path[len(PROC_SELF_FD):], flags)
    if guest_path == PROC_SELF_EXE:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise error(errno.ETXTBSY)                # a running program is not written
        return k.files.open_host(k.program_host_path(), flags)
    fifo_fd = _open_fifo(k, guest_path, flags)
    if fifo_fd is not None:
        return k.files.adopt(guest_path, fifo_fd, flags, 0)
    return k.files.open(guest_path, flags, mode)


def _open_fifo(k, guest_path: str, flags: int) -> int | None:
    """A blocking open of an existing FIFO, waiting for its other end in a thread so that a
    save can still be served (the open is then re-issued after the restore). None if the path
    is no FIFO or the open would not block."""
    if flags & (os.O_NONBLOCK | os.O_CREAT) or flags & os.O_ACCMODE == os.O_RDWR \
            or k.stop_fd is None:
        return None
    try:
        probe = k.namespace.open(guest_path, os.O_PATH)
    except OSError:
        return None                             # the ordinary open reports it
    try:
        if not stat.S_ISFIFO(os.fstat(probe).st_mode):
            return None
        return _wait_for_fifo(k, f"/proc/self/fd/{probe}", flags)
    finally:
        os.close(probe)


def _wait_for_fifo(k, proc_path: str, flags: int) -> int:
    outcome: dict[str, object] = {}
    done_r, done_w = os.pipe2(os.O_CLOEXEC)

    def opener() -> None:
        try:
            outcome["fd"] = os.open(proc_path, flags | os.O_CLOEXEC)
        except OSError as e:
            outcome["error"] = e
        finally:
            os.write(done_w, b"x")
    thread = threading.Thread(target=opener, daemon=True, name="fifo-open")
    thread.start()
    try:
        if k.stop_fd in select.select([done_r, k.stop_fd], [], [])[0] and "fd" not in outcome:
            other = os.O_RDONLY if flags & os.O_ACCMODE == os.O_WRONLY else os.O_WRONLY
            release = os.open(proc_path, other | os.O_NONBLOCK | os.O_CLOEXEC)
            thread.join()
            os.close(release)
            if "fd" in outcome:
                os.close(outcome["fd"])
            raise CallInterrupted()
        thread.join()
    finally:
        os.close(done_r)
        os.close(done_w)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["fd"]


def _reopen_guest_fd(k, number: str, flags: int) -> int:
    """open("/proc/self/fd/N"): a new description of the file guest fd N has open."""
    if not number.isdigit():
        raise error(errno.ENOENT)
    guest_file = k.files.get(int(number))
    return k.files.open_host(f"/proc/self/fd/{guest_file.host_fd}", flags, guest_file.entry)


@syscall(8, "lseek", "fd off whence")
def sys_lseek(k, fd, offset, whence):
    return os.lseek(k.host_fd(fd), signed64(offset), whence)


@syscall(5, "fstat", "fd ptr")
def sys_fstat(k, fd, buf):
    return k.write_stat(os.fstat(k.host_fd(fd)), buf)


@syscall(4, "stat", "path ptr")
def sys_stat(k, path, buf):
    return k.write_stat(k.stat_path(k.resolve(AT_FDCWD, path), nofollow=False), buf)


@syscall(6, "lstat", "path ptr")
def sys_lstat(k, path, buf):
    return k.write_stat(k.stat_path(k.resolve(AT_FDCWD, path), nofollow=True), buf)


def _stat_at(k, dirfd, path, flags) -> os.stat_result:
    if flags & AT_EMPTY_PATH and k.path(path) == "":
        return os.fstat(k.host_fd(dirfd))
    return k.stat_path(k.resolve(dirfd, path), nofollow=bool(flags & AT_SYMLINK_NOFOLLOW))


@syscall(262, "newfstatat", "dirfd path ptr hex")
def sys_newfstatat(k, dirfd, path, buf, flags):
    return k.write_stat(_stat_at(k, dirfd, path, flags), buf)


@syscall(332, "statx", "dirfd path hex hex ptr")
def sys_statx(k, dirfd, path, flags, mask, buf):
    st = _stat_at(k, dirfd, path, flags)
    times = []
    for seconds, ns in ((st.st_atime, st.st_atime_ns), (0, 0), (st.st_ctime, st.st_ctime_ns),
                        (st.st_mtime, st.st_mtime_ns)):
        times += [int(seconds), ns % 10**9, 0]
    k.memory.write(buf, STATX.pack(
        STATX_BASIC_STATS, st.st_blksize, 0, st.st_nlink, st.st_uid, st.st_gid, st.st_mode,
        st.st_ino, st.st_size, st.st_blocks, 0, *times, os.major(st.st_rdev),
        os.minor(st.st_rdev), os.major(st.st_dev), os.minor(st.st_dev)))
    return 0


@syscall(76, "truncate", "path size")
def sys_truncate(k, path, length):
    host_fd = k.namespace.open(k.resolve(AT_FDCWD, path), os.O_WRONLY)
    try:
        return sys_ftruncate_host(k, host_fd, length)
    finally:
        os.close(host_fd)


@syscall(77, "ftruncate", "fd size")
def sys_ftruncate(k, fd, length):
    return sys_ftruncate_host(k, k.host_fd(fd), length)


def sys_ftruncate_host(k, host_fd: int, length: int) -> int:
    length = signed64(length)
    if length < 0:
        raise error(errno.EINVAL)
    if k.max_file_size is not None and length > k.max_file_size:
        raise error(errno.EFBIG)
    os.ftruncate(host_fd, length)
    return 0


@syscall(74, "fsync", "fd")
def sys_fsync(k, fd):
    os.fsync(k.host_fd(fd))
    return 0


@syscall(75, "fdatasync", "fd")
def sys_fdatasync(k, fd):
    os.fdatasync(k.host_fd(fd))
    return 0


@syscall(162, "sync")
def sys_sync(k):
    return 0


@syscall(221, "fadvise64", "fd off size int")
def sys_fadvise64(k, fd, offset, length, advice):
    k.host_fd(fd)
    return 0


@syscall(40, "sendfile", "fd fd ptr size")
def sys_sendfile(k, out_fd, in_fd, offset_addr, count):
    out_host, in_host = k.host_fd(out_fd), k.host_fd(in_fd)
    count = min(count, MAX_IO)
    if offset_addr:
        offset = int.from_bytes(k.memory.read(offset_addr, 8), "little")
        n = os.sendfile(out_host, in_host, offset, count)
        k.memory.write(offset_addr, (offset + n).to_bytes(8, "little"))
        return n
    return os.sendfile(out_host, in_host, None, count)


@syscall(326, "copy_file_range", "fd ptr fd ptr size hex")
def sys_copy_file_range(k, in_fd, in_off_addr, out_fd, out_off_addr, count, flags):
    in_host, out_host = k.host_fd(in_fd), k.host_fd(out_fd)
    in_off = int.from_bytes(k.memory.read(in_off_addr, 8), "little") if in_off_addr else None
    out_off = int.from_bytes(k.memory.read(out_off_addr, 8), "little") if out_off_addr else None
    n = os.copy_file_range(in_host, out_host, min(count, MAX_IO), in_off, out_off)
    if in_off_addr:
        k.memory.write(in_off_addr, (in_off + n).to_bytes(8, "little"))
    if out_off_addr:
        k.memory.write(out_off_addr, (out_off + n).to_bytes(8, "little"))
    return n


@syscall(21, "access", "path int")
def sys_access(k, path, mode):
    return sys_faccessat2(k, AT_FDCWD, path, mode, 0)


@syscall(269, "faccessat", "dirfd path int")
def sys_faccessat(k, dirfd, path, mode):
    return sys_faccessat2(k, dirfd, path, mode, 0)


@syscall(439, "faccessat2", "dirfd path int hex")
def sys_faccessat2(k, dirfd, path, mode, flags):
    if mode & ~7:
        raise error(errno.EINVAL)
    guest_path = k.resolve(dirfd, path)
    if guest_path == PROC_SELF_EXE:
        return 0 if os.access(k.program_host_path(), mode) else -errno.EACCES
    host_fd = k.namespace.open(guest_path, os.O_PATH | (
        os.O_NOFOLLOW if flags & AT_SYMLINK_NOFOLLOW else 0))
    try:
        ok = os.access(f"/proc/self/fd/{host_fd}", mode, effective_ids=bool(flags & AT_EACCESS))
    finally:
        os.close(host_fd)
    return 0 if ok else -errno.EACCES


@syscall(90, "chmod", "path mode")
def sys_chmod(k, path, mode):
    return sys_fchmodat(k, AT_FDCWD, path, mode)


@syscall(91, "fchmod", "fd mode")
def sys_fchmod(k, fd, mode):
    os.fchmod(k.host_fd(fd), mode & 0o777)
    return 0


@syscall(268, "fchmodat", "dirfd path mode")
def sys_fchmodat(k, dirfd, path, mode):
    """Set-uid, set-gid and sticky bits are never applied (see rootfs.MODE_BITS)."""
    host_fd = k.namespace.open(k.resolve(dirfd, path), os.O_PATH)
    try:
        os.chmod(f"/proc/self/fd/{host_fd}", mode & 0o777)
    finally:
        os.close(host_fd)
    return 0


def _chown(k, dirfd, path, uid, gid, flags) -> int:
    """Passed to the host: what the VMM's own user may do (as an unprivileged Linux process
    would get EPERM for another owner)."""
    uid, gid = signed32(uid), signed32(gid)
    if flags & AT_EMPTY_PATH and k.path(path) == "":
        os.fchown(k.host_fd(dirfd), uid, gid)
        return 0
    if flags & AT_SYMLINK_NOFOLLOW:
        with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    else:
        with k.namespace.followed(k.resolve(dirfd, path)) as host_path:
            os.chown(host_path, uid, gid)
    return 0


@syscall(92, "chown", "path int int")
def sys_chown(k, path, uid, gid):
    return _chown(k, AT_FDCWD, path, uid, gid, 0)


@syscall(94, "lchown", "path int int")
def sys_lchown(k, path, uid, gid):
    return _chown(k, AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW)


@syscall(93, "fchown", "fd int int")
def sys_fchown(k, fd, uid, gid):
    os.fchown(k.host_fd(fd), signed32(uid), signed32(gid))
    return 0


@syscall(260, "fchownat", "dirfd path int int hex")
def sys_fchownat(k, dirfd, path, uid, gid, flags):
    return _chown(k, dirfd, path, uid, gid, flags)


@syscall(280, "utimensat", "dirfd path ptr hex")
def sys_utimensat(k, dirfd, path, times, flags):
    raw = k.memory.read(times, TIMESPEC_PAIR.size) if times else None
    buffer = ctypes.create_string_buffer(raw, TIMESPEC_PAIR.size) if raw else None
    if not path:
        result = _libc.utimensat(k.host_fd(dirfd), None, buffer, 0)
    else:
        if flags & AT_SYMLINK_NOFOLLOW:
            with k.namespace.at(k.resolve(dirfd, path)) as (dir_fd, name):
                result = _libc.utimensat(dir_fd, os.fsencode(name), buffer, AT_SYMLINK_NOFOLLOW)
        else:
            with k.namespace.followed(k.resolve(dirfd, path)) as host_path:
                result = _libc.utimensat(HOST_AT_FDCWD, os.fsencode(host_path), buffer, 0)
    return 0 if result == 0 else -ctypes.get_errno()
