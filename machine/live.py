"""Live migration from the VMM's side: the guest keeps running in the main thread while a
sender thread streams its memory (vmstate/migration/live_send.py); for the last pages the
sender asks the run loop to pause the vCPU, and the run loop hands it the final state and
goes on (a host runs its other VMs and serves its control socket) until the sender has the
receiver's answer. If anything fails, the guest carries on here as if nothing had
happened. A host's cold `migrate` (ColdSend) is a hand-over alone: the VM stopped, its state
sent by a thread while the host goes on."""

from __future__ import annotations

import socket
import sys
import threading
from typing import Callable

import numpy as np

from vmstate.errors import describe_error
from vmstate.migration.live_send import LiveOptions, migrate_live
from vmstate.migration.send import close_files, connect, guest_files, send_vm
from vmstate.state import VmState

from .base import Machine
from .outcome import LiveSave
from .timing import timing_mark


def live_migrate_to(address: tuple[str, int], connect_timeout: float, with_files: bool,
                    root: str, options: LiveOptions, log=sys.stderr) -> LiveSave:
    def begin(vm: Machine) -> Migration:
        return Migration(vm, address, connect_timeout, with_files, root, options, log)
    return LiveSave(begin)


class Migration:
    """One live migration: the sender thread, and the hand-over with the run loop."""

    def __init__(self, vm: Machine, address: tuple[str, int], connect_timeout: float,
                 with_files: bool, root: str, options: LiveOptions, log):
        self.vm, self.address, self.log = vm, address, log
        self.view = vm.memory.view
        self.stopped_at = 0.0
        self.wants_pause = threading.Event()
        self.finished = threading.Event()
        self._state: VmState | None = None
        self._paused = threading.Event()
        self._result: str | None = None
        self._connection = SenderConnection()
        timing_mark("live-start")
        print(f"vmstate: live migration to {address[0]}:{address[1]} begins; the guest runs "
              "on", file=log, flush=True)
        self._thread = threading.Thread(
            target=self._send, args=(connect_timeout, with_files, root, options),
            daemon=True, name="live-migration")
        self._thread.start()

    # -- the sender thread ---------------------------------------------------------------------

    def _send(self, connect_timeout: float, with_files: bool, root: str,
              options: LiveOptions) -> None:
        try:
            sock = self._connection.open(self.address, connect_timeout, self.log)
            message = migrate_live(sock, self, with_files, root, options, self.log)
            self._result = f"migrated live to {self.address[0]}:{self.address[1]}: {message}"
        except (Exception, KeyboardInterrupt) as e:
            if not self._connection.cancelled.is_set():
                print(f"vmstate: live migration to {self.address[0]}:{self.address[1]} failed "
                      f"({describe_error(e)}); the VM carries on here", file=self.log,
                      flush=True)
        finally:
            self.vm.stop_tracking()
            self._connection.close()
            self.finished.set()
            self._paused.set()           # a pause that never came no longer waits
            self.vm.on_migration_end()

    # LiveSource, called from the sender thread
    def start_tracking(self) -> np.ndarray:
        return self.vm.start_tracking()

    def take_dirty(self) -> np.ndarray:
        return self.vm.take_dirty()

    def pause(self) -> VmState:
        self.wants_pause.set()
        self.vm.stop.request("live migration: the last pages")
        self._paused.wait()
        if self._state is None:
            raise ConnectionAbortedError("the guest ended before the last pages")
        return self._state

    # -- the run loop's side -------------------------------------------------------------------

    def hand_over(self, state: VmState, stopped_at: float) -> None:
        """The vCPU stopped at `stopped_at`: the sender sends the rest (result() waits)."""
        self.stopped_at = stopped_at
        self._state = state
        self._paused.set()

    def result(self) -> str | None:
        """Wait for the sender to end: where the VM went, or None if it did not get there."""
        self._thread.join()
        return self._result

    def abandon(self, why: str) -> None:
        """Cancel the migration and wait for the sender, which every blocking step of it
        notices at once (the connection is shut down, the connect retries watch the event)."""
        if not self.finished.is_set():
            print(f"vmstate: live migration to {self.address[0]}:{self.address[1]} abandoned: "
                  f"{why}", file=self.log, flush=True)
        self._connection.cancel()
        self._paused.set()
        self._thread.join()


class ColdSend:
    """A cold migration of a VM stopped between slices, sent by a thread (a HandOver: set as
    the VM's `handing_over` by Machine.send_away, it ends like a live migration's)."""

    def __init__(self, vm: Machine, address: tuple[str, int], connect_timeout: float,
                 with_files: bool, root: str,
                 failed: Callable[[BaseException], None] | None = None):
        """`failed` is called by result() (in its caller's thread) if the VM did not get
        there, with the exception."""
        self.address = address
        self.finished = threading.Event()
        self.message: str | None = None        # the receiver's, once it has the VM
        self.error = ""                        # why it did not get there
        self._failure: BaseException | None = None
        self._failed = failed
        self._connection = SenderConnection()
        self._thread = threading.Thread(
            target=self._send, args=(vm, vm.capture(), connect_timeout, with_files, root),
            daemon=True, name="migration")
        self._thread.start()

    def _send(self, vm: Machine, state: VmState, connect_timeout: float, with_files: bool,
              root: str) -> None:
        try:
            files = guest_files(state, root) if with_files else []
            try:
                sock = self._connection.open(self.address, connect_timeout, sys.stderr)
                self.message = send_vm(sock, state, [vm.memory.view], files)
            finally:
                close_files(files)
        except (Exception, KeyboardInterrupt) as e:
            self.error, self._failure = describe_error(e), e
        finally:
            self._connection.close()
            self.finished.set()
            vm.on_migration_end()

    def result(self) -> str | None:
        self._thread.join()
        if self.message is None:
            if self._failed is not None and self._failure is not None:
                self._failed(self._failure)
            return None
        return f"migrated to {self.address[0]}:{self.address[1]}: {self.message}"

    def abandon(self, why: str) -> None:
        self._connection.cancel()
        self._thread.join()


class SenderConnection:
    """A sender thread's connection, which another thread may cancel at any step: a connect
    under way stops retrying, an open connection is shut down (its blocking send or receive
    returns at once)."""

    def __init__(self):
        self.cancelled = threading.Event()
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def open(self, address: tuple[str, int], timeout: float, log) -> socket.socket:
        sock = connect(address, timeout, log, self.cancelled)
        with self._lock:                  # cancel shuts down the socket it finds here
            self._socket = sock
        if self.cancelled.is_set():
            raise ConnectionAbortedError("abandoned")
        return sock

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
