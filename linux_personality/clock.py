"""Time system calls."""

from __future__ import annotations

import errno
import struct
import time

from .table import signed32, syscall

TIMESPEC = struct.Struct("<qq")


@syscall(228, "clock_gettime", "clock ptr")
def sys_clock_gettime(k, clock, buf):
    try:
        now = time.clock_gettime_ns(signed32(clock))
    except OSError:
        return -errno.EINVAL
    k.memory.write(buf, TIMESPEC.pack(*divmod(now, 10**9)))
    return 0
