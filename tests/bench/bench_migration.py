"""Migration over loopback of guests with 1 GiB and 4 GiB of memory (benchlib.SIZES_MIB) in
the four layouts of benchlib.LAYOUTS: time from the SAVE request to the receiver's
acknowledgement against a plain socket transfer of the same number of bytes (sendall of 4 MiB
slices into recv_into of a fresh anonymous buffer, as the receiver's guest memory is) in the
same run (target: at least 0.9x its throughput), and the downtime from the guest's SAVE
request to its next instruction on the receiver. The migrations and the plain transfers
alternate, so a change in the machine's load hits both; the load average is printed. Run
with `make bench`."""

import os
import socket
import statistics
import subprocess
import sys

import pytest

from benchlib import LAYOUTS, SIZES_MIB, fill_arguments, report, timing_marks

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
    data[offset:offset + (1 << 20)] = b"\\x5a" * min(1 << 20, size - offset)
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


def migrate_once(vmstate_cmd, program, memory_mib, layout, tmp_path):
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    port = free_port()
    receiver = subprocess.Popen([vmstate_cmd, "receive", "--bind", "127.0.0.1", "--port",
                                 str(port), "--run", "--once", "--root", str(tmp_path)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert receiver.stderr.readline().startswith("Waiting for VM image")
    sender = subprocess.run([vmstate_cmd, "run", "--memory", f"{memory_mib}M", "--migrate-to",
                             f"127.0.0.1:{port}", program, *fill_arguments(layout, memory_mib),
                             "exit"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    _, err = receiver.communicate(timeout=300)
    assert receiver.returncode == 0, err
    sent, got = timing_marks(sender.stderr), timing_marks(err)
    received = next(int(line.split()[1]) for line in err.splitlines()
                    if line.startswith("Received "))
    return ((sent["save-done"] - sent["save-start"]) / 1e9,
            (got["first-kvm-run"] - sent["save-start"]) / 1e9, received)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory_mib", SIZES_MIB)
def test_migration(vmstate_cmd, example, tmp_path, layout, memory_mib):
    results, plains = [], []
    for _ in range(RUNS):
        results.append(migrate_once(vmstate_cmd, example("fill_memory"), memory_mib, layout,
                                    tmp_path))
        plains.append(plain_transfer_seconds(results[0][2]))
    migrate = statistics.median(r[0] for r in results)
    downtime = statistics.median(r[1] for r in results)
    sent = results[0][2]
    plain = statistics.median(plains)
    gib = sent / 2**30
    report(f"migration of a {memory_mib} MiB guest, {layout}, {sent >> 20} MiB sent, over "
           f"loopback (medians of {RUNS}; load average {os.getloadavg()[0]:.1f})", [
        ("SAVE request -> receiver's acknowledgement (verified, started)",
         f"{migrate * 1e3:.0f} ms, {gib / migrate:.2f} GiB/s"),
        ("baseline: plain socket transfer of the same bytes", f"{plain * 1e3:.0f} ms, "
                                                             f"{gib / plain:.2f} GiB/s"),
        ("migration / plain transfer (throughput; target >= 0.9)", f"{plain / migrate:.2f}x"),
        ("the same, fastest runs (single runs on this host vary several times)",
         f"{min(plains) / min(r[0] for r in results):.2f}x"),
        ("downtime: SAVE request -> next guest instruction on the receiver",
         f"{downtime * 1e3:.0f} ms")])
