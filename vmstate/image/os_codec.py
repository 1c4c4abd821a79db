"""The vmm-os section (schemas/image-format.md 6.15): the Linux personality's state of the
guest process. Layouts are in layout.py."""

from __future__ import annotations

import os

from ..state import Descriptor, GuestOs, Pipe, SignalAction
from . import layout as L
from .codec import PayloadReader, _string



def encode_os(g: GuestOs) -> bytes:
    ss_sp, ss_flags, ss_size = g.altstack
    parts = [L.OS_HEADER.pack(g.umask, g.uid, g.gid, g.blocked, g.pending, ss_sp, ss_flags,
                              ss_size, g.alarm_ns, g.alarm_interval_ns),
             _string(os.fsencode(g.cwd)), _string(os.fsencode(g.hostname)),
             L.COUNT.pack(len(g.descriptors))]
    parts += [L.DESCRIPTOR.pack(d.fd, d.description, d.pipe, d.flags, int(d.cloexec))
              for d in g.descriptors]
    parts.append(L.COUNT.pack(len(g.pipes)))
    for pipe in g.pipes:
        parts.append(L.PIPE.pack(pipe.id, len(pipe.buffered)))
        parts.append(pipe.buffered.ljust(L.align(len(pipe.buffered)), b"\0"))
    parts.append(L.COUNT.pack(len(g.actions)))
    parts += [L.SIGNAL_ACTION.pack(a.signal, a.handler, a.flags, a.restorer, a.mask)
              for a in g.actions]
    parts.append(L.COUNT.pack(len(g.limits)))
    parts += [L.LIMIT.pack(*limit) for limit in g.limits]
    return b"".join(parts)


def decode_os(data: bytes) -> GuestOs:
    r = PayloadReader(data)
    umask, uid, gid, blocked, pending, ss_sp, ss_flags, ss_size, alarm, interval = \
        r.take(L.OS_HEADER)
    cwd = os.fsdecode(r.take_bytes(r.take(L.STRING)[0]))
    hostname = os.fsdecode(r.take_bytes(r.take(L.STRING)[0]))
    descriptors = []
    for _ in range(r.take(L.COUNT)[0]):
        fd, description, pipe, flags, cloexec = r.take(L.DESCRIPTOR)
        if cloexec > 1:
            raise ValueError(f"descriptor {fd}: cloexec byte {cloexec} is not 0 or 1")
        descriptors.append(Descriptor(fd, description, bool(cloexec), pipe, flags))
    pipes = []
    for _ in range(r.take(L.COUNT)[0]):
        pipe_id, length = r.take(L.PIPE)
        if length > L.MAX_PIPE_BYTES:
            raise ValueError(f"pipe {pipe_id} holds {length} bytes (at most {L.MAX_PIPE_BYTES})")
        pipes.append(Pipe(pipe_id, r.take_bytes(length)))
    actions = tuple(SignalAction(*r.take(L.SIGNAL_ACTION)) for _ in range(r.take(L.COUNT)[0]))
    limits = tuple(r.take(L.LIMIT) for _ in range(r.take(L.COUNT)[0]))
    r.end()
    if umask > 0o777:
        raise ValueError(f"umask {umask:#o} has bits beyond 0777")
    return GuestOs(cwd=cwd, umask=umask, hostname=hostname, uid=uid, gid=gid,
                   descriptors=tuple(descriptors), pipes=tuple(pipes), actions=actions,
                   blocked=blocked, pending=pending, altstack=(ss_sp, ss_flags, ss_size),
                   alarm_ns=alarm, alarm_interval_ns=interval, limits=limits)
