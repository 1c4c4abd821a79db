"""Guest output tagged with its VM's name, for several VMs sharing one terminal: the guest's
stdout (or stderr) is a pipe, and a thread copies each whole line to the VMM's own stream
as `[name] line` (a last line without a newline is copied when the pipe closes)."""

from __future__ import annotations

import os
import signal
import threading

CHUNK = 1 << 16


class TaggedOutput:
    def __init__(self, tag: str, out_fd: int):
        self.prefix = f"[{tag}] ".encode()
        self.out_fd = out_fd
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._copy, daemon=True, name=f"output-{tag}")
        self._thread.start()

    def _copy(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})   # the host's slice timer
        pending = b""
        while chunk := os.read(self.read_fd, CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                self._write(b"".join(self.prefix + line + b"\n" for line in lines))
        if pending:
            self._write(self.prefix + pending + b"\n")
        os.close(self.read_fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.out_fd, view):]
            except OSError:          # the VMM's stream is gone (a closed pipe): drop the output
                return

    def close(self) -> None:
        """Close the guest's end and wait until everything written has been copied."""
        os.close(self.write_fd)
        self._thread.join()
