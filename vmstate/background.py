"""A function running in a background thread, or in a forked child process, whose result (or
exception) is collected later."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    """Starts `function()` in a daemon thread: a process that fails or is interrupted in the
    meantime exits without waiting for it. result() waits, then returns its value or raises
    its exception in the caller's thread."""

    def __init__(self, function: Callable[[], T], name: str):
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True,
                                        name=name)
        self._thread.start()

    def _run(self, function: Callable[[], T]) -> None:
        try:
            self._value = function()
        except BaseException as e:      # re-raised by result(), in the caller's thread
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class ForkedCall:
    """Runs `function()` in a child process forked at once, for CPU-bound work that holds the
    GIL (xxhash on page-sized buffers does): beside this process's threads it gets a core of
    its own instead of taking turns with them. result() waits, then returns the function's
    value or raises its exception (either pickled back) in the caller's thread. close() ends
    a child still running. Fork with no other thread running (or none holding a lock the function
    needs): the child has only the forking thread."""

    def __init__(self, function: Callable[[], object], name: str):
        self.name = name
        read_end, write_end = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:
            os.close(read_end)
            _run_child(function, write_end)
        os.close(write_end)
        self._pipe: int | None = read_end
        self._error: BaseException | None = None
        self._value = None
        self._collecting = threading.Lock()    # one reader of the pipe at a time
        self._reaping = threading.Lock()       # no kill once the child is reaped (pid reuse)
        self._reaped = False

    def result(self):
        with self._collecting:
            if self._pipe is not None:
                self._error, self._value = self._collect()
        if self._error is not None:
            raise self._error
        return self._value

    def close(self) -> None:
        with self._reaping:
            if not self._reaped:
                os.kill(self._pid, signal.SIGKILL)
        with self._collecting:          # after a result() under way in another thread, if any
            if self._pipe is not None:
                self._error, self._value = self._collect()

    def _collect(self) -> tuple[BaseException | None, object]:
        """(error, value) from the child's report and wait status."""
        report = bytearray()
        while data := os.read(self._pipe, 1 << 16):
            report += data
        os.close(self._pipe)
        self._pipe = None
        with self._reaping:
            _, status = os.waitpid(self._pid, 0)
            self._reaped = True
        if status != 0 or not report:
            return ChildProcessError(f"{self.name}: the child process ended with wait status "
                                     f"{status:#x}"), None
        import pickle
        ok, outcome = pickle.loads(report)
        return (None, outcome) if ok else (outcome, None)


def _run_child(function: Callable[[], object], report: int) -> None:
    """The child's life: the function, then (True, its value) or (False, its exception)
    down the pipe; never returns (os._exit: none of the parent's exit handlers or buffered
    output runs twice)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
        import pickle
        try:
            data = pickle.dumps((True, function()))
        except BaseException as e:
            try:
                data = pickle.dumps((False, e))
            except Exception:               # an exception that does not pickle: its text
                data = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
        view = memoryview(data)
        while view:
            view = view[os.write(report, view):]
    finally:
        os._exit(0)
