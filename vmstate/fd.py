"""Objects that own one file descriptor, opening the regular files they read, emptying a
wake-up pipe, and whole reads, writes and allocations at file offsets."""

import ctypes
import os
import stat

from .errors import FileMissingError, VmstateError


class FdOwner:
    """Owns `self.fd`: close() closes it once; usable as a context manager."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_to_read(path: str, what: str, error: type[VmstateError]) -> int:
    """Open the regular file `path` read-only. A missing file is a FileMissingError
    ("PATH: no such WHAT"); a directory, FIFO or device, or any other failure, an `error`
    naming the path. O_NONBLOCK: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileMissingError(f"{path}: no such {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot open: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file")
    return fd


def drain(fd: int) -> None:
    """Read out whatever the non-blocking pipe `fd` holds (wake-up bytes), without waiting."""
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


MAX_WRITE = 1 << 30          # Linux writes at most ~2 GiB per call; keep calls well below


def pwrite_all(fd: int, data, offset: int) -> None:
    """pwrite all of `data` (bytes-like) at `offset`, at most MAX_WRITE bytes a call,
    resuming after short writes. The views taken of `data` are released even when pwrite
    raises (else the buffer, a mapping say, could not be closed while the error goes up)."""
    with memoryview(data) as whole, whole.cast("B") as view:
        done = 0
        while done < len(view):
            with view[done:done + MAX_WRITE] as part:
                done += os.pwrite(fd, part, offset + done)


def read_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from file `fd` at `offset`; EOFError if the file ends first."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends before offset {offset + len(buffer):#x}")
        done += got


def allocate(fd: int, offset: int, length: int) -> None:
    """Allocate a file's blocks before writing them (fallocate, mode 0): a write over
    allocated blocks skips ext4's delayed-allocation work per page, about a third of the
    cost of writing through the page cache here. Best effort: where it fails (a file system
    without fallocate, no space, a file size limit) the write that follows allocates as
    usual or reports the error itself. The system call, not glibc's posix_fallocate, which
    would write zeros where the file system lacks it."""
    _libc.fallocate(fd, 0, offset, length)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
