"""Time system calls. Sleeps wait on the VMM's stop pipe, so a save request during one is
served at once (the sleep is re-issued after the restore, not cut short with EINTR)."""

from __future__ import annotations

import errno
import select
import struct
import time

from .paths import error
from .stops import CallInterrupted
from .table import signed32, syscall

TIMESPEC = struct.Struct("<qq")
TIMEVAL = struct.Struct("<qq")
TIMER_ABSTIME = 1
CLOCK_REALTIME = 0
CLOCK_RESOLUTION_NS = 1


def _clock(clock: int) -> int:
    clock = signed32(clock)
    try:
        time.clock_getres(clock)
    except OSError:
        raise error(errno.EINVAL) from None
    return clock


@syscall(228, "clock_gettime", "clock ptr")
def sys_clock_gettime(k, clock, buf):
    now = time.clock_gettime_ns(_clock(clock))
    k.memory.write(buf, TIMESPEC.pack(*divmod(now, 10**9)))
    return 0


@syscall(229, "clock_getres", "clock ptr")
def sys_clock_getres(k, clock, buf):
    _clock(clock)
    if buf:
        k.memory.write(buf, TIMESPEC.pack(0, CLOCK_RESOLUTION_NS))
    return 0


@syscall(96, "gettimeofday", "ptr ptr")
def sys_gettimeofday(k, tv, tz):
    if tv:
        seconds, ns = divmod(time.time_ns(), 10**9)
        k.memory.write(tv, TIMEVAL.pack(seconds, ns // 1000))
    if tz:
        k.memory.write(tz, bytes(8))
    return 0


@syscall(201, "time", "ptr")
def sys_time(k, tloc):
    now = int(time.time())
    if tloc:
        k.memory.write(tloc, struct.pack("<q", now))
    return now


def _read_timespec(k, addr: int) -> int:
    seconds, ns = TIMESPEC.unpack(k.memory.read(addr, TIMESPEC.size))
    if seconds < 0 or not 0 <= ns < 10**9:
        raise error(errno.EINVAL)
    return seconds * 10**9 + ns


def sleep_until(k, clock: int, deadline_ns: int) -> None:
    while (left := deadline_ns - time.clock_gettime_ns(clock)) > 0:
        watch = [k.stop_fd] if k.stop_fd is not None else []
        if select.select(watch, [], [], left / 1e9)[0]:
            raise CallInterrupted()


def _sleep_for(k, clock: int, duration_ns: int) -> None:
    """A relative sleep. Interrupted by the host (a save), it leaves what was left in
    k.sleep_left_ns, and its re-issue (the next call the guest makes, after the restore)
    sleeps only that."""
    if k.resumed_sleep_ns is not None:
        duration_ns = min(duration_ns, k.resumed_sleep_ns)
    deadline = time.clock_gettime_ns(clock) + duration_ns
    try:
        sleep_until(k, clock, deadline)
    except CallInterrupted:
        k.sleep_left_ns = max(0, deadline - time.clock_gettime_ns(clock))
        raise


@syscall(35, "nanosleep", "ptr ptr")
def sys_nanosleep(k, request, remain):
    _sleep_for(k, time.CLOCK_MONOTONIC, _read_timespec(k, request))
    return 0


@syscall(230, "clock_nanosleep", "clock hex ptr ptr")
def sys_clock_nanosleep(k, clock, flags, request, remain):
    clock = _clock(clock)
    value = _read_timespec(k, request)
    if flags & TIMER_ABSTIME:
        sleep_until(k, clock, value)
    else:
        _sleep_for(k, clock, value)
    return 0


@syscall(100, "times", "ptr")
def sys_times(k, buf):
    ticks = int(time.process_time() * 100)
    if buf:
        k.memory.write(buf, struct.pack("<4q", ticks, 0, 0, 0))
    return int(time.monotonic() * 100)
