"""Migration over loopback of guests with 64 MiB and 1 GiB of memory, a quarter touched:
memory throughput against a plain socket transfer of the same bytes (sendall of 4 MiB slices
into recv_into of a fresh buffer as large as guest memory) in the same run, and the downtime
from the guest's SAVE request to its next instruction on the receiver. Run with `make bench`."""

import os
import socket
import statistics
import subprocess
import sys

import pytest

from benchlib import report

pytestmark = pytest.mark.kvm
RUNS = 5

PLAIN_RECEIVER = """
import mmap, socket, sys, time
size, port = int(sys.argv[1]), int(sys.argv[2])
with socket.create_server(("127.0.0.1", port)) as listener:
    print("ready", flush=True)
    conn, _ = listener.accept()
    buffer = memoryview(mmap.mmap(-1, size))
    start, received = time.perf_counter(), 0
    while received < size:
        received += conn.recv_into(buffer[received:received + (4 << 20)])
    print(time.perf_counter() - start, flush=True)
"""

PLAIN_SENDER = """
import mmap, socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
data = mmap.mmap(-1, size)
for offset in range(0, size, 1 << 20):
    data[offset:offset + (1 << 20)] = b"\\x5a" * (1 << 20)
view = memoryview(data)
with socket.create_connection(("127.0.0.1", port)) as sock:
    for offset in range(0, size, 4 << 20):
        sock.sendall(view[offset:offset + (4 << 20)])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_transfer_seconds(size: int) -> float:
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", PLAIN_RECEIVER, str(size), str(port)],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline() == "ready\n"
    subprocess.run([sys.executable, "-c", PLAIN_SENDER, str(size), str(port)], check=True)
    seconds = float(receiver.stdout.readline())
    receiver.wait()
    return seconds


def marks(text: str) -> dict[str, int]:
    return {line.split()[1]: int(line.split()[2]) for line in text.splitlines()
            if line.startswith("vmstate-timing ")}


def migrate_once(vmstate_cmd, program, memory_mib, touched_mib, tmp_path):
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    port = free_port()
    receiver = subprocess.Popen([vmstate_cmd, "receive", "--bind", "127.0.0.1", "--port",
                                 str(port), "--run", "--once", "--root", str(tmp_path)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert receiver.stderr.readline().startswith("Waiting for VM image")
    sender = subprocess.run([vmstate_cmd, "run", "--memory", f"{memory_mib}M", "--migrate-to",
                             f"127.0.0.1:{port}", program, str(touched_mib)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, check=True)
    out, err = receiver.communicate(timeout=300)
    assert out == f"{touched_mib} MiB intact after restore\n", err
    sent, got = marks(sender.stderr), marks(err)
    return ((sent["save-done"] - sent["save-start"]) / 1e9,
            (got["first-kvm-run"] - sent["save-start"]) / 1e9)


@pytest.mark.parametrize("memory_mib, touched_mib", [(64, 16), (1024, 256)])
def test_migration(vmstate_cmd, example, tmp_path, memory_mib, touched_mib):
    results = [migrate_once(vmstate_cmd, example("fill_memory"), memory_mib, touched_mib,
                            tmp_path) for _ in range(RUNS)]
    migrate = statistics.median(r[0] for r in results)
    downtime = statistics.median(r[1] for r in results)
    touched = touched_mib << 20
    plain = statistics.median(plain_transfer_seconds(touched) for _ in range(RUNS))
    gib = touched / 2**30
    report(f"migration of a {memory_mib} MiB guest, {touched_mib} MiB touched, over loopback "
           f"(medians of {RUNS})", [
        ("SAVE request -> receiver's acknowledgement (verified, started)",
         f"{migrate * 1e3:.0f} ms, {gib / migrate:.2f} GiB/s of guest memory"),
        ("baseline: plain socket transfer of the same bytes", f"{plain * 1e3:.0f} ms, "
                                                             f"{gib / plain:.2f} GiB/s"),
        ("migration / plain transfer", f"{plain / migrate:.2f}x the throughput"),
        ("downtime: SAVE request -> next guest instruction on the receiver",
         f"{downtime * 1e3:.0f} ms")])
