"""Guest physical memory: one host mapping that KVM uses as memory slot 0 (and the
personality's GuestMemory, see linux_personality.cpu).

A fresh VM gets anonymous memory; a restored VM maps the image's memory privately (copy on
write), so restoring costs no copy. Guest addresses are identity-mapped (virtual == physical),
so a guest pointer is an offset into this mapping once it has been bounds-checked against the
user range. The VMM's own writes are tracked here; KVM's dirty log tracks the guest's.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

from linux_personality.cpu import GuestFault
from vmstate.mapping import close_mapping
from vmstate.state import PAGE_SIZE

MAP_NORESERVE = 0x4000  # <sys/mman.h>; Python's mmap module does not export it


class GuestMemory:
    def __init__(self, size: int, *, image_fd: int | None = None, image_offset: int = 0,
                 huge_pages: bool = True):
        """Fresh anonymous memory (with transparent huge pages unless `huge_pages` is false:
        a received VM fills only its present pages, and a huge page would allocate and zero
        512 pages for each scattered one), or an image's memory mapped copy-on-write."""
        self.size = size
        if image_fd is None:
            self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
            if huge_pages:
                self._map.madvise(mmap.MADV_HUGEPAGE)
        else:
            self._map = mmap.mmap(image_fd, size, mmap.MAP_PRIVATE | MAP_NORESERVE,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=image_offset)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        self.user_start = self.user_end = 0      # no guest pointer is valid until set
        self._vmm_written = _page_marks(size)
        self._written_lock = threading.Lock()    # a live migration's sender takes the marks

    def close(self) -> None:
        del self._anchor
        self.view = None
        close_mapping(self._map)

    # -- the VMM's own access (boot structures, stacks, state capture): no user-range check ---

    def write_phys(self, addr: int, data) -> None:
        end = addr + len(data)
        if addr < 0 or end > self.size:
            raise GuestFault(f"physical range {addr:#x}+{len(data):#x} outside guest memory")
        self.view[addr:end] = data
        self.mark_written(addr, len(data))

    def read_phys(self, addr: int, length: int) -> bytes:
        if addr < 0 or addr + length > self.size:
            raise GuestFault(f"physical range {addr:#x}+{length:#x} outside guest memory")
        return bytes(self.view[addr:addr + length])

    def mark_written(self, addr: int, length: int) -> None:
        if length <= 0:
            return
        first, last = addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE
        with self._written_lock:
            self._vmm_written[first:last + 1] = b"\x01" * (last - first + 1)

    def take_written(self) -> mmap.mmap:
        """One byte per page, 1 where the VMM itself wrote since the previous call (KVM's
        dirty log misses these)."""
        with self._written_lock:
            taken, self._vmm_written = self._vmm_written, _page_marks(self.size)
        return taken

    # -- guest pointers: untrusted, checked against the user range ------------------------------

    def set_user_range(self, start: int, end: int) -> None:
        self.user_start, self.user_end = start, min(end, self.size)

    def check(self, addr: int, length: int) -> None:
        """Raise GuestFault unless [addr, addr+length) is user memory (empty ranges always pass,
        as Linux accepts a zero-length buffer anywhere)."""
        if length == 0:
            return
        if length < 0 or addr < self.user_start or addr + length > self.user_end:
            raise GuestFault(f"bad guest pointer {addr:#x} (length {length})")

    def read(self, addr: int, length: int) -> bytes:
        self.check(addr, length)
        return bytes(self.view[addr:addr + length])

    def user_view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of guest user memory (for the VMM's writes, mark it written)."""
        self.check(addr, length)
        return self.view[addr:addr + length] if length else self.view[0:0]   # empty, writable

    def write(self, addr: int, data) -> None:
        self.check(addr, len(data))
        self.view[addr:addr + len(data)] = data
        self.mark_written(addr, len(data))

    def zero(self, addr: int, length: int) -> None:
        self.check(addr, length)
        chunk = 1 << 20
        zeros = bytes(min(length, chunk))
        for start in range(addr, addr + length, chunk):
            n = min(chunk, addr + length - start)
            self.view[start:start + n] = zeros[:n]
        self.mark_written(addr, length)

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string of at most `limit` bytes (ENAMETOOLONG-style cap)."""
        self.check(addr, 1)
        end = min(addr + limit, self.user_end)
        nul = self._map.find(b"\0", addr, end)
        if nul < 0:
            raise GuestFault(f"unterminated string at {addr:#x}")
        return bytes(self.view[addr:nul])


def _page_marks(size: int) -> mmap.mmap:
    """A byte per page of `size` bytes of memory, all 0: anonymous memory, so that making
    one costs nothing however large the guest (its pages are zeroed as marks touch them)."""
    return mmap.mmap(-1, max(size // PAGE_SIZE, 1))
