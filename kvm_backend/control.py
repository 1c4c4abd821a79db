"""The control socket (`--control PATH`): a unix socket speaking JSON lines, after QMP.

On connecting, a client gets a greeting line {"vmstate": {"version": ..., "vms": [...]}}. Each
request is one line {"execute": COMMAND, "arguments": {...}} and gets one reply line
{"return": ...} or {"error": {"class": ..., "desc": ...}}; a line that is not such a request
gets an error reply and the connection stays open. Commands are served by the host's main
thread between time slices (host.py). Only the socket's owner may connect: the socket file is
mode 0600 and each peer's uid (SO_PEERCRED) must be ours, else it gets one error line and is
disconnected. The commands are in host_commands.py; the protocol is specified in
schemas/control-protocol.md.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import threading

from vmstate.errors import UsageError

from .host import Host, Request, error_reply, quiet_thread

MAX_LINE = 1 << 16
MAX_CLIENTS = 64         # replies under way that close() waits for
REPLY_GRACE = 2.0        # seconds close() waits for each
PROTOCOL_VERSION = "1.0"
PEERCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


class ControlServer:
    def __init__(self, path: str, host: Host):
        self.path = path
        self.host = host
        self.sock, self._identity = _listen(path)
        self._closed = False
        self._replying = threading.Semaphore(MAX_CLIENTS)   # one unit per reply not yet sent
        threading.Thread(target=self._accept, daemon=True, name="control-accept").start()

    def close(self) -> None:
        """Stop listening and remove the socket file once the replies under way are sent
        (`quit` gets its answer); clients still connected get EOF when the process ends."""
        self._closed = True
        for _ in range(MAX_CLIENTS):
            self._replying.acquire(timeout=REPLY_GRACE)
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        quiet_thread()
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="control-client").start()

    def _serve(self, conn: socket.socket) -> None:
        quiet_thread()
        with conn, conn.makefile("rwb", buffering=0) as stream:
            _pid, uid, _gid = PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
            if uid != os.geteuid():
                _send(stream, error_reply(f"uid {uid} may not control this VMM (only its "
                                          f"owner, uid {os.geteuid()})", "PermissionDenied"))
                return
            _send(stream, {"vmstate": {"version": PROTOCOL_VERSION,
                                       "vms": [h.name for h in self.host.vms]}})
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    _send(stream, error_reply(f"line longer than {MAX_LINE} bytes"))
                    return
                if not line.strip():
                    continue
                with self._replying:
                    _send(stream, self._answer(line))

    def _answer(self, line: bytes) -> dict:
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return error_reply(f"not JSON: {e}")
        except RecursionError:
            return error_reply("not a request: JSON nested too deeply")
        if not isinstance(message, dict) or not isinstance(message.get("execute"), str):
            return error_reply('expected {"execute": COMMAND, "arguments": {...}}')
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            return error_reply('"arguments" must be an object')
        if self.host.quitting:
            return error_reply("the VMM is quitting")
        request = Request(message["execute"], arguments)
        self.host.submit(request)
        return request.reply.get()


def _send(stream, message: dict) -> None:
    try:
        stream.write(json.dumps(message).encode() + b"\n")
    except OSError:
        pass                    # the client went away; its thread ends at the next read


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, mode 0600 from its creation, and the socket file's
    (device, inode) so that close removes only our own. A stale socket (nobody listening) is
    replaced; anything else at `path` is refused."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise UsageError(f"--control {path}: cannot create the socket: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(8)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--control {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise UsageError(f"--control {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise UsageError(f"--control {path}: another VMM is listening there")
