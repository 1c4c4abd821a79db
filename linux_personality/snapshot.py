"""The personality's state as plain data (vmstate.state.GuestOs and the file table) and back:
what a save captures and a restore rebuilds, beyond memory and registers."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import replace

from vmstate.errors import RestoreError
from vmstate.state import DEFAULT_MAX_FDS, Descriptor, GuestOs, OpenFile, Pipe, SignalAction

from .fdtable import FD_PIPE, FileTable, GuestFile
from .identity import Identity
from .signals import SIGACTION, STACK_T, SignalState

F_SETPIPE_SZ = 1031


def capture(files: FileTable, identity: Identity, signals: SignalState
            ) -> tuple[tuple[OpenFile, ...], GuestOs]:
    entries: dict[int, OpenFile] = {}
    descriptors = []
    pipe_ids: dict[int, int] = {}                 # host pipe inode -> pipe id in the image
    buffered: dict[int, bytes] = {}
    first_fd: dict[int, int] = {}                 # id(description) -> its lowest fd
    for fd in files.fds():
        guest_file = files.get(fd)
        description = first_fd.setdefault(id(guest_file), fd)
        cloexec = files.is_cloexec(fd)
        if guest_file.entry.kind != FD_PIPE:
            descriptors.append(Descriptor(fd, description, cloexec))
            leader = entries.get(description)
            entries[fd] = files.snapshot_entry(fd) if leader is None else replace(leader, fd=fd)
            continue
        pipe_id = pipe_ids.setdefault(os.fstat(guest_file.host_fd).st_ino, len(pipe_ids))
        flags = fcntl.fcntl(guest_file.host_fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK)
        if flags & os.O_ACCMODE == os.O_RDONLY and pipe_id not in buffered:
            buffered[pipe_id] = _buffered(files, guest_file)
        descriptors.append(Descriptor(fd, description, cloexec, pipe_id, flags))
    ss_sp, ss_flags, _, ss_size = STACK_T.unpack(signals.altstack)
    now = time.monotonic()
    guest_os = GuestOs(
        cwd=files.namespace.cwd.lstrip("/") or ".", umask=files.namespace.umask,
        hostname=identity.hostname, uid=identity.uid, gid=identity.gid,
        descriptors=tuple(descriptors),
        pipes=tuple(Pipe(pipe_id, buffered.get(pipe_id, b"")) for pipe_id in pipe_ids.values()),
        actions=tuple(SignalAction(sig, *SIGACTION.unpack(raw))
                      for sig, raw in sorted(signals.actions.items())),
        blocked=signals.blocked, pending=signals.pending, altstack=(ss_sp, ss_flags, ss_size),
        alarm_ns=0 if signals.alarm_at is None else max(1, int((signals.alarm_at - now) * 1e9)),
        alarm_interval_ns=int(signals.alarm_interval * 1e9),
        limits=tuple((r, soft, hard) for r, (soft, hard) in sorted(identity.limits.items())))
    return tuple(entries.values()), guest_os


def _buffered(files: FileTable, reader: GuestFile) -> bytes:
    """The bytes waiting in a pipe: read out, and written back through a write end the guest
    holds (so that the running guest loses nothing if the save fails)."""
    flags = fcntl.fcntl(reader.host_fd, fcntl.F_GETFL)
    fcntl.fcntl(reader.host_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    chunks = []
    try:
        while chunk := os.read(reader.host_fd, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        fcntl.fcntl(reader.host_fd, fcntl.F_SETFL, flags)
    data = b"".join(chunks)
    inode = os.fstat(reader.host_fd).st_ino
    for fd in files.fds():
        other = files.get(fd)
        if other.entry.kind == FD_PIPE and other.entry.flags & os.O_ACCMODE == os.O_WRONLY \
                and os.fstat(other.host_fd).st_ino == inode:
            os.write(other.host_fd, data)
            break
    return data


def restore(root: str, entries: tuple[OpenFile, ...], guest_os: GuestOs | None,
            max_fds: int = DEFAULT_MAX_FDS) -> tuple[FileTable, Identity, SignalState]:
    if guest_os is None:                          # an image from before vmm-os
        return FileTable.reopen(root, entries, max_fds), Identity(), SignalState()
    shared = {d.fd: d.description for d in guest_os.descriptors}
    own = tuple(e for e in entries if shared.get(e.fd, e.fd) == e.fd)
    files = FileTable.reopen(root, own, max_fds)
    try:
        _restore_descriptors(files, entries, guest_os)
        files.namespace.enter("/" + guest_os.cwd if guest_os.cwd != "." else "/")
    except OSError as e:
        files.close_all()
        raise RestoreError(f"guest state: {e.strerror} ({e.filename or 'cwd'})") from None
    except BaseException:
        files.close_all()
        raise
    files.namespace.umask = guest_os.umask
    identity = Identity(hostname=guest_os.hostname, uid=guest_os.uid, gid=guest_os.gid,
                        limits={r: (soft, hard) for r, soft, hard in guest_os.limits})
    signals = SignalState(
        actions={a.signal: SIGACTION.pack(a.handler, a.flags, a.restorer, a.mask)
                 for a in guest_os.actions},
        blocked=guest_os.blocked, pending=guest_os.pending,
        altstack=STACK_T.pack(guest_os.altstack[0], guest_os.altstack[1], 0,
                              guest_os.altstack[2]),
        alarm_at=time.monotonic() + guest_os.alarm_ns / 1e9 if guest_os.alarm_ns else None,
        alarm_interval=guest_os.alarm_interval_ns / 1e9)
    return files, identity, signals


def _restore_descriptors(files: FileTable, entries, guest_os: GuestOs) -> None:
    """Shared descriptions, close-on-exec flags and pipes (with their bytes) on top of the
    reopened file table."""
    pipes = {pipe.id: pipe for pipe in guest_os.pipes}
    host_pipes: dict[int, tuple[int, int]] = {}
    for pipe_id, pipe in pipes.items():
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        if len(pipe.buffered) > 1 << 16:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, len(pipe.buffered))
        os.write(write_end, pipe.buffered)
        host_pipes[pipe_id] = (read_end, write_end)
    by_description: dict[int, GuestFile] = {}
    try:
        for d in guest_os.descriptors:
            if d.pipe >= 0:
                if d.description in by_description:
                    files.install(by_description[d.description], d.fd, d.cloexec)
                    continue
                read_end, write_end = host_pipes[d.pipe]
                writing = d.flags & os.O_ACCMODE == os.O_WRONLY
                host_fd = os.dup(write_end if writing else read_end)
                fcntl.fcntl(host_fd, fcntl.F_SETFL, d.flags & os.O_NONBLOCK)
                guest_file = GuestFile(OpenFile(d.fd, FD_PIPE, "", d.flags), host_fd)
                files.install(guest_file, d.fd, d.cloexec)
                by_description[d.description] = guest_file
            elif d.description != d.fd:
                files.install(files.get(d.description), d.fd, d.cloexec)
            else:
                files.set_cloexec(d.fd, d.cloexec)
    except KeyError:
        raise OSError(errno.EINVAL, "descriptor refers to a missing pipe or description") \
            from None
    finally:
        for read_end, write_end in host_pipes.values():
            os.close(read_end)
            os.close(write_end)
