"""Stopping a running vCPU from outside the run loop: on a host signal (save on SIGUSR1 /
SIGINT) or when the restore-time memory check fails.

A request sets `requested`, makes `cancel_fd` readable (to wake a blocking read on stdin), and
kicks the vCPU: `immediate_exit` makes the next KVM_RUN return at once, and a real-time signal
to the main thread interrupts a KVM_RUN already under way. It kicks until the run loop says it
has stopped, so a request landing just before KVM_RUN is entered is never lost. Signals are
noticed through Python's wakeup fd by a watcher thread, which runs while the main thread is
blocked in KVM_RUN.
"""

from __future__ import annotations

import os
import signal
import threading

from vmstate.fd import drain

KICK_SIGNAL = signal.SIGRTMIN
KICK_INTERVAL = 0.005


class StopRequest:
    def __init__(self, run_page):
        self.run_page = run_page
        self.requested = threading.Event()
        self.reason = ""
        self._stopped = threading.Event()
        self._kicker: threading.Thread | None = None
        self._lock = threading.Lock()         # a request and a reset do not interleave
        self.watched: frozenset[int] = frozenset()     # the host signals that request a stop
        self._main = threading.main_thread().ident
        self.cancel_fd, self._cancel_w = os.pipe()
        os.set_blocking(self.cancel_fd, False)          # drained by clear_interrupted_call
        signal.signal(KICK_SIGNAL, lambda *_: None)    # interrupts KVM_RUN, nothing more

    def request(self, reason: str) -> None:
        """Ask the run loop to stop (any thread)."""
        with self._lock:
            if self.requested.is_set():
                return
            self.reason = reason
            self.requested.set()
            self.run_page.immediate_exit = 1        # KVM: the next KVM_RUN returns at once
            os.write(self._cancel_w, b"x")
            self._kicker = threading.Thread(target=self._kick, daemon=True, name="vcpu-kick")
            self._kicker.start()

    def interrupt_call(self) -> None:
        """Wake the blocking call the guest is in (CallInterrupted) without asking the VM to
        stop: the run loop rewinds the call, which the guest re-issues when it runs again (a
        host ends a time slice this way)."""
        os.write(self._cancel_w, b"i")

    def clear_interrupted_call(self) -> None:
        """Before the guest runs again: forget interrupt_call's wake-ups (never a stop's)."""
        drain(self.cancel_fd)
        if self.requested.is_set():          # a request that came meanwhile keeps its wake-up
            os.write(self._cancel_w, b"x")

    def _kick(self) -> None:
        while not self._stopped.wait(KICK_INTERVAL):
            self.run_page.immediate_exit = 1
            signal.pthread_kill(self._main, KICK_SIGNAL)

    def stopped(self) -> None:
        """The run loop has stopped the vCPU: stop kicking."""
        self._stopped.set()

    def reset(self) -> None:
        """The run loop has handled the request and the guest carries on (a live migration
        began, or failed and left the guest here, or a save was refused): accept the next
        request."""
        with self._lock:
            self.stopped()
            if self._kicker is not None:
                self._kicker.join()
                self._kicker = None
            try:
                os.read(self.cancel_fd, 64)
            except BlockingIOError:
                pass
            self.run_page.immediate_exit = 0
            self.requested.clear()
            self._stopped.clear()

    def close(self) -> None:
        """Stop kicking and release the pipe (the signal watcher, if any, stays for the
        process: Python has one wakeup fd)."""
        self.stopped()
        for fd in (self.cancel_fd, self._cancel_w):
            os.close(fd)

    def on_signals(self, signals: list[signal.Signals]) -> None:
        """Request a stop when any of `signals` arrives (call from the main thread)."""
        if not signals:
            return
        wanted = {int(s) for s in signals}
        self.watched = frozenset(wanted)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for sig in signals:
            signal.signal(sig, lambda *_: None)         # the watcher does the work
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch() -> None:
            while True:
                for signum in os.read(read_fd, 64):
                    if signum in wanted:
                        self.request(f"signal {signal.Signals(signum).name}")
        threading.Thread(target=watch, daemon=True, name="signal-watch").start()
