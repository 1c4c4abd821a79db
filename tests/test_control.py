"""The control socket (`--control`, `vmstate ctl`): every command on a host of three VMs,
a second client at the same time, garbage answered with errors, a client of another uid
refused; and `run --control` for a single VM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from helpers import one_line_error
from vmstate.migration import protocol as P
from test_migration import Receiver

pytestmark = pytest.mark.kvm


def _command(command: str, arguments: dict) -> bytes:
    return json.dumps({"execute": command, "arguments": arguments}).encode()


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rwb", buffering=0)
        self.greeting = self.read()

    def read(self) -> dict:
        return json.loads(self.stream.readline())

    def send_line(self, line: bytes) -> dict:
        self.stream.write(line + b"\n")
        return self.read()

    def request(self, command: str, **arguments) -> None:
        """Send a command without waiting for its reply (read() it later)."""
        self.stream.write(_command(command, arguments) + b"\n")

    def execute(self, command: str, **arguments) -> dict:
        return self.send_line(_command(command, arguments))

    def ok(self, command: str, **arguments):
        reply = self.execute(command, **arguments)
        assert "return" in reply, reply
        return reply["return"]

    def close(self):
        self.stream.close()
        self.sock.close()


def wait_for(path, process, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.05)


@pytest.fixture
def started(vmstate_cmd, tmp_path):
    processes = []

    def start(*args, socket_path=tmp_path / "vmm.sock"):
        process = subprocess.Popen([vmstate_cmd, *map(str, args)], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(process)
        wait_for(socket_path, process)
        return process
    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def states(client) -> dict[str, str]:
    return {vm["name"]: vm["state"] for vm in client.ok("query-vms")}


def test_every_command_two_clients_and_garbage(started, vmstate, vmstate_cmd, guest, tmp_path):
    # The first two must still be running when the test stops them: 40 ticks of 200 million
    # spins take seconds with three VMs sharing the thread (of 20 million, they ended 0.64 s
    # after the socket appeared, and a test held up that long found them gone).
    ticker = guest("ticker")
    host = started("host", "--control", "vmm.sock", "-v", f"{ticker} 40 200 3",
                   "-v", f"{ticker} 40 200 4", "-v", f"{ticker} 100000 20 5")
    assert os.stat(tmp_path / "vmm.sock").st_mode & 0o777 == 0o600
    first = Client(tmp_path / "vmm.sock")
    assert first.greeting["vmstate"]["vms"] == ["ticker", "ticker-2", "ticker-3"]
    for name in ("ticker", "ticker-2", "ticker-3"):
        assert first.ok("stop", vm=name) == {}
    assert states(first) == {"ticker": "stopped", "ticker-2": "stopped", "ticker-3": "stopped"}
    slices = {vm["name"]: vm["slices"] for vm in first.ok("query-vms")}
    time.sleep(0.3)
    assert {vm["name"]: vm["slices"] for vm in first.ok("query-vms")} == slices   # none ran

    second = Client(tmp_path / "vmm.sock")                 # while the first stays connected
    for garbage in (b"garbage", b"{}", b'{"execute": 5}', b"[1]", b'{"execute": "stop", '
                    b'"arguments": []}', b'{"execute": "no-such-command"}', b"\xff\xfe"):
        reply = second.send_line(garbage)
        assert reply["error"]["class"] == "GenericError" and reply["error"]["desc"], reply
    assert second.execute("stop")["error"]["desc"] == 'name the VM: "vm": NAME'
    assert "no VM named" in second.execute("cont", vm="nobody")["error"]["desc"]
    assert second.execute("snapshot", vm="ticker")["error"]["desc"].startswith("argument 'path'")
    assert set(states(second)) == {"ticker", "ticker-2", "ticker-3"}       # still serving

    dump = first.ok("dump-state", vm="ticker")["text"]
    assert "[ticker] processor state of VM ticker" in dump and "rip 0x" in dump
    assert "efer 0x" in dump and "Next instructions" in dump
    assert first.ok("snapshot", vm="ticker", path="a.sav") == {"path": "a.sav"}
    assert states(first)["ticker"] == "stopped"                           # it goes on (stopped)
    saved = second.ok("save", vm="ticker-2", path="b.sav")
    assert saved["path"] == "b.sav" and states(first)["ticker-2"] == "saved"
    assert "has ended" in first.execute("cont", vm="ticker-2")["error"]["desc"]

    receiver = Receiver(vmstate_cmd, tmp_path, "--run", "--once", "--root", tmp_path)
    try:
        first.ok("migrate", vm="ticker", address=f"127.0.0.1:{receiver.port}")
        assert states(first)["ticker"] == "saved"
        assert receiver.process.wait(timeout=60) == 3
        ticks = receiver.process.stdout.read().decode().splitlines()
        assert ticks[-1] == "tick 39"
    finally:
        receiver.stop()

    assert first.ok("cont", vm="ticker-3") == {}
    assert states(first)["ticker-3"] == "running"
    ctl = vmstate("ctl", "vmm.sock", "query-vms", "--json")
    assert ctl.returncode == 0 and json.loads(ctl.stdout)["return"][2]["name"] == "ticker-3"
    bad = vmstate("ctl", "vmm.sock", "stop", "nobody")
    assert bad.returncode == 125
    assert bad.stderr.decode() == "vmstate: ctl stop: no VM named 'nobody'\n"
    assert vmstate("ctl", "vmm.sock", "quit").returncode == 0
    out, err = host.communicate(timeout=60)
    assert host.returncode == 137, err                   # ticker-3 ended by quit
    assert b"ticker-3  status 137  ended by quit" in err
    assert not (tmp_path / "vmm.sock").exists()
    first.close()
    second.close()

    restored = vmstate("restore", "a.sav")                # the snapshot goes on from its point
    assert restored.returncode == 3 and restored.stdout.decode().splitlines()[-1] == "tick 39"
    assert vmstate("split", "a.sav").returncode == 0       # and splits and joins, unchanged
    assert vmstate("join", "vm.core", "hw.xml", "-o", "a2.sav").returncode == 0
    assert (tmp_path / "a2.sav").read_bytes() == (tmp_path / "a.sav").read_bytes()
    restored = vmstate("restore", "b.sav")
    assert restored.returncode == 4 and restored.stdout.decode().splitlines()[-1] == "tick 39"


NOBODY = 65534
CONNECT_AS_NOBODY = """
import json, os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.errno})); sys.exit()
print(s.makefile("rb").readline().decode().strip())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_client_of_another_uid_is_refused(started, guest):
    directory = tempfile.mkdtemp(prefix="vmstate-ctl-")     # pytest's own are closed to others
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "vmm.sock")
    host = None
    try:
        host = started("host", "--control", path, "-v", f"{guest('ticker')} 100000 20 0",
                       socket_path=path)
        _refuse_nobody(path)
        out, err = host.communicate(timeout=60)
        assert host.returncode == 137, err
    finally:
        if host is not None:       # the VMM removes its socket as it ends: not under rmtree
            if host.poll() is None:
                host.kill()
            host.wait()
        shutil.rmtree(directory)


def _refuse_nobody(path):
    def as_nobody() -> dict:
        result = subprocess.run([sys.executable, "-c", CONNECT_AS_NOBODY, path],
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    assert as_nobody() == {"connect": 13}                   # EACCES: the socket is mode 0600
    os.chmod(path, 0o666)                                   # even if its mode were lost:
    reply = as_nobody()
    assert reply["error"]["class"] == "PermissionDenied"     # SO_PEERCRED says who it is
    assert f"uid {NOBODY} may not control" in reply["error"]["desc"]
    owner = Client(path)                                      # the VMM is unharmed
    assert states(owner) == {"ticker": "running"}
    owner.ok("quit")
    owner.close()


def test_run_and_restore_with_a_control_socket(started, vmstate, guest, tmp_path):
    run = started("run", "--control", "vmm.sock", guest("ticker"), "100000", "20", "6")
    client = Client(tmp_path / "vmm.sock")
    assert client.greeting["vmstate"]["vms"] == ["ticker"]
    assert client.ok("stop") == {}                     # one VM: no name needed
    assert states(client) == {"ticker": "stopped"}
    assert client.ok("save")["path"] == "vm_image.sav"
    client.close()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0 and b"vmstate: VM saved to vm_image.sav" in err, err

    restore = started("restore", "--control", "vmm.sock", "vm_image.sav")
    client = Client(tmp_path / "vmm.sock")
    assert states(client) == {"vm_image": "running"}
    client.ok("quit")
    client.close()
    out, err = restore.communicate(timeout=60)
    assert restore.returncode == 137 and err.decode().strip() == "vmstate: ended by quit", err


def test_a_guest_blocked_in_a_read_does_not_hold_up_the_control_socket(vmstate_cmd, example,
                                                                       tmp_path):
    run = subprocess.Popen([vmstate_cmd, "run", "--control", "vmm.sock", example("echo_lines")],
                           cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        wait_for(tmp_path / "vmm.sock", run)
        client = Client(tmp_path / "vmm.sock")
        time.sleep(0.3)                                  # it waits for its first line by now
        assert states(client) == {"echo_lines": "running"}
        assert "[echo_lines] processor state" in client.ok("dump-state")["text"]
        client.close()
        out, err = run.communicate(b"first\nsecond\n", timeout=60)   # no input was lost
        assert run.returncode == 0, err
        assert out.decode().splitlines() == ["line 1: first (5 bytes)",
                                             "line 2: second (6 bytes)", "2 lines read"]
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def test_control_serves_a_vm_on_the_software_cpu(vmstate_cmd, guest, tmp_path):
    run = subprocess.Popen([vmstate_cmd, "run", "--cpu", "soft", "--control", "vmm.sock",
                            guest("ticker"), "100000", "1", "0"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(tmp_path / "vmm.sock", run)
        client = Client(tmp_path / "vmm.sock")
        assert states(client) == {"ticker": "running"}
        assert "[ticker] processor state" in client.ok("dump-state")["text"]
        client.ok("quit")
        client.close()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 137 and err.decode().strip() == "vmstate: ended by quit", err
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def test_control_with_an_instruction_budget_is_refused(vmstate, guest):
    result = vmstate("run", "--control", "vmm.sock", "--max-instructions", "1000",
                     guest("ticker"), "1", "1", "0")
    assert result.returncode == 2
    assert one_line_error(result).startswith(
        "vmstate: --max-instructions cannot be combined with --control")


@pytest.mark.parametrize("cpu", ["kvm", "soft"])
def test_migrate_live_from_the_control_socket(started, vmstate_cmd, guest, tmp_path, cpu):
    """`migrate live=true`: the VM runs on in its slices while its memory goes, then ends here
    as migrated; the receiver goes on with the ticks, none lost or repeated. On KVM and on
    the software CPU."""
    # The VM must not reach its 60th tick before the hand-over: on KVM 20 million spins a tick
    # left it about 15 ticks (0.2 s) to spare here; 200 million leave it seconds. The software
    # CPU is some 150 times slower: 20 million are plenty.
    ticker, spin = guest("ticker"), 200 if cpu == "kvm" else 20
    host = started("host", "--cpu", cpu, "--control", "vmm.sock", "-v", f"{ticker} 60 {spin} 6",
                   "-v", f"{ticker} 100000 20 7")
    client = Client(tmp_path / "vmm.sock")
    receiver = Receiver(vmstate_cmd, tmp_path, "--run", "--once", "--root", tmp_path)
    try:
        time.sleep(0.2)
        reply = client.ok("migrate", vm="ticker", address=f"127.0.0.1:{receiver.port}",
                          live=True)
        assert "live migration" in reply["description"]
        deadline = time.monotonic() + 60
        while states(client)["ticker"] != "saved" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert states(client)["ticker"] == "saved"
        assert states(client)["ticker-2"] == "running"          # the other VM went on
        assert receiver.process.wait(timeout=60) == 6
        received = receiver.process.stdout.read().decode().splitlines()
    finally:
        receiver.stop()
    client.ok("quit")
    client.close()
    out, err = host.communicate(timeout=60)
    here = [line.removeprefix("[ticker] ") for line in out.decode().splitlines()
            if line.startswith("[ticker] ")]
    assert here + received == [f"tick {i}" for i in range(60)], (here, received)
    assert b"live migration to 127.0.0.1" in err


class FailingReceiver:
    """A real TCP peer that speaks live migration (protocol 3.0) until the sender's END, then
    closes the connection without a verdict; with `stall`, it first stops answering until
    `release`."""

    def __init__(self, stall: bool):
        self.stall = stall
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.got_end = threading.Event()
        self._release = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(60)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(60)
                P.recv_exact(conn, P.HELLO.size, "hello")
                P.send_reply(conn, P.STATUS_OK, "protocol 3.0")
                while not self.got_end.is_set():
                    kind, _, _, _, length = P.FRAME.unpack(P.recv_exact(conn, P.FRAME.size,
                                                                        "frame"))
                    P.recv_exact(conn, length, "payload")
                    if kind == P.FRAME_SYNC:
                        P.send_reply(conn, P.STATUS_OK, "synced")
                    if kind == P.FRAME_END:
                        self.got_end.set()
                if self.stall:
                    self._release.wait(120)      # no verdict
        except BaseException as e:
            self.error = e
        finally:
            self.listener.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(60)


@pytest.mark.parametrize("cpu", ["kvm", "soft"])
def test_a_live_migration_failing_at_the_hand_over_leaves_the_vm_running_here(
        started, guest, tmp_path, cpu):
    """The receiver takes the last pages and state, then hangs up: the VM goes on here, no
    tick lost or repeated, and the host goes on serving its control socket."""
    ticker, spin = guest("ticker"), 20 if cpu == "kvm" else 1
    host = started("host", "--cpu", cpu, "--control", "vmm.sock", "-v",
                   f"{ticker} 100000 {spin} 6", "-v", f"{ticker} 100000 {spin} 7")
    client = Client(tmp_path / "vmm.sock")
    peer = FailingReceiver(stall=False)
    client.ok("migrate", vm="ticker", address=f"127.0.0.1:{peer.port}", live=True)
    assert peer.got_end.wait(60), peer.error
    peer.release()
    assert peer.error is None, peer.error
    before = query(client)["ticker"]["slices"]
    wait_until(lambda: query(client)["ticker"]["slices"] > before, "the VM did not go on here")
    assert query(client)["ticker"]["state"] == "running"
    err = _quit_with_ticks_unbroken(client, host)
    assert f"live migration to 127.0.0.1:{peer.port} failed".encode() in err, err


@pytest.mark.parametrize("cpu", ["kvm", "soft"])
def test_a_stalled_live_migration_receiver_holds_up_only_its_vm(started, guest, tmp_path,
                                                                  cpu):
    """The receiver takes the last pages and state, then never answers. The host does not
    wait for it: the control socket answers, the other VM runs on, the migrating VM stays
    stopped and is not saved elsewhere meanwhile; when the connection closes, the migration
    fails and the VM goes on here, no tick lost or repeated."""
    ticker, spin = guest("ticker"), 20 if cpu == "kvm" else 1
    host = started("host", "--cpu", cpu, "--control", "vmm.sock", "-v",
                   f"{ticker} 100000 {spin} 6", "-v", f"{ticker} 100000 {spin} 7")
    client = Client(tmp_path / "vmm.sock")
    peer = FailingReceiver(stall=True)
    try:
        client.ok("migrate", vm="ticker", address=f"127.0.0.1:{peer.port}", live=True)
        assert peer.got_end.wait(60), peer.error
        first = query(client)                      # this query went unanswered before
        assert first["ticker"]["description"] == "running, handing over to a migration receiver"
        assert "handing over" in client.execute("save", vm="ticker")["error"]["desc"]
        wait_until(lambda: query(client)["ticker-2"]["slices"] > first["ticker-2"]["slices"],
                   "the other VM did not run")
        assert query(client)["ticker"]["slices"] == first["ticker"]["slices"]   # stopped
    finally:
        peer.release()
    assert peer.error is None, peer.error
    wait_until(lambda: query(client)["ticker"]["slices"] > first["ticker"]["slices"],
               "the VM did not go on here")
    assert query(client)["ticker"]["state"] == "running"
    err = _quit_with_ticks_unbroken(client, host)
    assert f"live migration to 127.0.0.1:{peer.port} failed".encode() in err, err


def test_a_cold_migration_to_a_stalled_receiver_holds_up_only_its_vm(started, guest,
                                                                      tmp_path):
    """`migrate` (cold) to a receiver that takes the VM and never answers: the reply waits,
    but the host does not: another client is served and the other VM runs; when the
    connection closes the reply is the failure and the VM goes on here."""
    ticker = guest("ticker")
    host = started("host", "--control", "vmm.sock", "-v", f"{ticker} 100000 20 6", "-v",
                   f"{ticker} 100000 20 7")
    migrating, client = Client(tmp_path / "vmm.sock"), Client(tmp_path / "vmm.sock")
    peer = FailingReceiver(stall=True)
    try:
        migrating.request("migrate", vm="ticker", address=f"127.0.0.1:{peer.port}")
        assert peer.got_end.wait(60), peer.error
        first = query(client)                      # this query went unanswered before
        assert first["ticker"]["description"] == "running, handing over to a migration receiver"
        assert "handing over" in client.execute("migrate", vm="ticker",
                                                address="127.0.0.1:1")["error"]["desc"]
        wait_until(lambda: query(client)["ticker-2"]["slices"] > first["ticker-2"]["slices"],
                   "the other VM did not run")
        assert query(client)["ticker"]["slices"] == first["ticker"]["slices"]   # stopped
    finally:
        peer.release()
    assert peer.error is None, peer.error
    failure = migrating.read()["error"]["desc"]
    assert failure.startswith("migration failed (") and failure.endswith("the VM goes on")
    wait_until(lambda: query(client)["ticker"]["slices"] > first["ticker"]["slices"],
               "the VM did not go on here")
    migrating.close()
    _quit_with_ticks_unbroken(client, host)


def test_quit_during_a_cold_migration_answers_its_client(started, guest, tmp_path):
    """`quit` while a `migrate` waits for a receiver that never answers: the VM ends with the
    host, the migration is abandoned, and its client gets an error reply, not a closed
    connection."""
    host = started("host", "--control", "vmm.sock", "-v", f"{guest('ticker')} 100000 20 6")
    migrating, client = Client(tmp_path / "vmm.sock"), Client(tmp_path / "vmm.sock")
    peer = FailingReceiver(stall=True)
    try:
        migrating.request("migrate", vm="ticker", address=f"127.0.0.1:{peer.port}")
        assert peer.got_end.wait(60), peer.error
        client.ok("quit")
        assert migrating.read() == {"error": {"class": "GenericError", "desc": (
            "the VM ended here (ended by quit) before its receiver answered")}}
    finally:
        peer.release()
        client.close()
        migrating.close()
    host.communicate(timeout=60)


def test_a_guests_migrate_para_call_to_a_stalled_receiver_holds_up_only_its_vm(
        started, guest, tmp_path):
    """MIGRATE (para-call 403) in a host, to a receiver that takes the VM and never answers:
    the host serves and runs the other VM meanwhile; when the connection closes the call
    fails in the guest, which goes on here."""
    peer = FailingReceiver(stall=True)
    host = started("host", "--control", "vmm.sock", "-v",
                   f"{guest('paracalls')} 127.0.0.1:{peer.port}", "-v",
                   f"{guest('ticker')} 100000 20 7")
    client = Client(tmp_path / "vmm.sock")
    try:
        assert peer.got_end.wait(60), peer.error
        first = query(client)                      # this query went unanswered before
        assert first["paracalls"]["description"] == \
            "running, handing over to a migration receiver"
        wait_until(lambda: query(client)["ticker"]["slices"] > first["ticker"]["slices"],
                   "the other VM did not run")
        assert query(client)["paracalls"]["slices"] == first["paracalls"]["slices"]
    finally:
        peer.release()
    assert peer.error is None, peer.error
    wait_until(lambda: query(client)["paracalls"]["state"] == "exited",
               "the VM did not go on here")
    client.ok("quit")
    client.close()
    out, err = host.communicate(timeout=60)
    lines = [line for line in out.decode().splitlines() if line.startswith("[paracalls] ")]
    assert lines[-2].startswith("[paracalls] migrate=-") and \
        lines[-1] == "[paracalls] original goes on, marker Original", lines
    assert f"[paracalls] MIGRATE to 127.0.0.1:{peer.port} failed".encode() in err, err


def test_a_save_signal_during_a_failed_migrate_para_call_still_saves(vmstate_cmd, guest,
                                                                     tmp_path):
    """SIGUSR1 while the guest's MIGRATE waits for a receiver's verdict: when the migration
    fails, the guest goes on here and the signal's save is made (the wait used to forget
    it, and the guest ran on unsaved)."""
    peer = FailingReceiver(stall=True)
    run = subprocess.Popen([vmstate_cmd, "run", "--save-on-signal", guest("paracalls"),
                            f"127.0.0.1:{peer.port}"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        assert peer.got_end.wait(60), peer.error
        threads = len(os.listdir(f"/proc/{run.pid}/task"))
        run.send_signal(signal.SIGUSR1)
        # The VMM has taken the request once it starts the thread that kicks its vCPU loop
        # (the signal is read by a watcher thread, which could come after the release).
        wait_until(lambda: len(os.listdir(f"/proc/{run.pid}/task")) > threads,
                   "the VMM did not take the save request")
    finally:
        peer.release()
    out, err = run.communicate(timeout=60)
    assert peer.error is None, peer.error
    assert run.returncode == 0, err
    assert b"VM saved to vm_image.sav" in err, err
    assert (tmp_path / "vm_image.sav").exists()


def _quit_with_ticks_unbroken(client, host) -> bytes:
    """Quit the host: the VM named ticker printed its ticks with none lost or repeated,
    whatever migration failed on the way. Returns the host's stderr."""
    client.ok("quit")
    client.close()
    out, err = host.communicate(timeout=60)
    here = [line for line in out.decode().splitlines() if line.startswith("[ticker] ")]
    assert here == [f"[ticker] tick {i}" for i in range(len(here))]
    return err


def query(client) -> dict[str, dict]:
    return {vm["name"]: vm for vm in client.ok("query-vms")}


def wait_until(condition, failure: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)
