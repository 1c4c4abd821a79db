"""Assertions, waits and a TCP relay shared by the tests."""

import contextlib
import os
import socket
import threading
import time


def one_line_error(result) -> str:
    """Assert the command failed with exactly one line on stderr and no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmstate: "), stderr
    return lines[0]


NETNS_SENDER, NETNS_RECEIVER = "10.231.0.1", "10.231.0.2"   # the `namespaces` fixture's hosts


def wait_until_blocked(pid: int, still: float = 0.4, timeout: float = 60) -> None:
    """Until the VMM process has slept for `still` seconds on end: the guest is then blocked
    in its call (a fixed sleep could end before a loaded machine got there, and a signal
    that came before the VMM's handler would kill it)."""
    deadline, asleep_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        now = time.monotonic()
        asleep_since = (asleep_since or now) if state == "S" else None
        if asleep_since is not None and now - asleep_since >= still:
            return
        time.sleep(0.02)
    raise AssertionError(f"the VMM (pid {pid}) never blocked")


def cpu_seconds(pid: int) -> float:
    """User and system time the process has used so far (a KVM guest's time counts as user
    time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_computing(pid: int, seconds: float = 0.1, timeout: float = 60) -> None:
    """Until the process has used `seconds` more of CPU time: a guest that only computes is
    then in its loop, however long a loaded machine took to run it that far (a fixed sleep
    measures the wrong clock: the guest may have had all of it, or none)."""
    start, deadline = cpu_seconds(pid), time.monotonic() + timeout
    while cpu_seconds(pid) - start < seconds:
        assert time.monotonic() < deadline, f"process {pid} did not compute"
        time.sleep(0.01)


class HoldingRelay:
    """A TCP relay on a free loopback port to `port`: it forwards the first `limit` bytes its
    client sends, then holds the rest (the client blocks once the socket buffers are full)
    until release() or until the server hangs up; replies flow back all along. A test that
    kills one end once `holding` is set kills it mid-transfer for certain (a kill timed by
    watching the transfer could come after its end on a loaded machine). When the server
    goes, the client is closed with data unread: it sees its connection reset."""

    def __init__(self, port: int, limit: int):
        self.target, self.limit, self.forwarded = port, limit, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding, self._released = threading.Event(), threading.Event()
        self._server_gone = False
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    def release(self, timeout: float = 60) -> None:
        """Forward the rest, until the client's end of stream; return when the relay ended."""
        self._released.set()
        self._thread.join(timeout)

    def _relay(self) -> None:
        with self.listener:
            self.listener.settimeout(120)
            client = self.listener.accept()[0]
        with client, socket.create_connection(("127.0.0.1", self.target)) as server:
            back = threading.Thread(target=self._back, args=(server, client), daemon=True)
            back.start()
            if self._forward(client, server, self.limit):
                self.holding.set()
                self._released.wait()
                if not self._server_gone:
                    self._forward(client, server, None)
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)
            back.join()

    def _forward(self, source: socket.socket, sink: socket.socket, limit: int | None) -> bool:
        """Copy until `limit` bytes in all (True), or the end of either connection (False)."""
        while limit is None or self.forwarded < limit:
            want = 1 << 20 if limit is None else min(1 << 20, limit - self.forwarded)
            try:
                data = source.recv(want)
                if not data:
                    return False
                sink.sendall(data)
            except OSError:
                return False
            self.forwarded += len(data)
        return True

    def _back(self, server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(1 << 16):
                client.sendall(data)
        self._server_gone = True
        self._released.set()
