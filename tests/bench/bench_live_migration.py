"""Live migration of a 1 GiB guest (896 MiB of it written) over loopback, idle and dirtying
16, 64 and 256 MiB/s of scattered pages, against a cold migration of the same guest in the
same run: downtime (the source's vCPU stop -> the receiver's first KVM_RUN, both
CLOCK_MONOTONIC on this host), total time (the start of the migration -> the receiver's first
KVM_RUN), and bytes sent against the guest's present memory. Run with `make bench`;
LIVE_BENCH_CPU=soft makes the software CPU the sender (the cold baseline too), LIVE_BENCH_RUNS
sets the runs per row."""

import os
import re
import select
import socket
import statistics
import subprocess
import time

import pytest

from benchlib import report, warm_up_memory

pytestmark = pytest.mark.kvm
RUNS = int(os.environ.get("LIVE_BENCH_RUNS", "5"))
SENDER_CPU = os.environ.get("LIVE_BENCH_CPU", "kvm")   # soft: the software CPU sends
MEMORY, BUFFER_MIB = "1G", 896
STEPS, SAVE_AT = 10 ** 6, 50           # the guest runs on until the receiver is stopped


@pytest.fixture(scope="module", autouse=True)
def warm_memory():
    """Two 1 GiB guests and their buffers need fresh pages: warm 4 GiB (not the suite's 14,
    so that this benchmark stays within its share of the machine)."""
    warm_up_memory(4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marks(text: str) -> dict[str, int]:
    return {line.split()[1]: int(line.split()[2]) for line in text.splitlines()
            if line.startswith("vmstate-timing ")}


def _read_until(stream, label: str, timeout: float = 300) -> str:
    """Lines of `stream` up to the one holding the timing mark `label`."""
    text, deadline = "", time.monotonic() + timeout
    while f"vmstate-timing {label} " not in text:
        assert time.monotonic() < deadline, text
        if select.select([stream], [], [], 1)[0]:
            line = stream.readline().decode()
            assert line, text
            text += line
    return text


def migrate_once(vmstate_cmd, program, directory, rate_mib: int, live: bool):
    """(downtime s, total s, bytes sent / bytes present or None) of one migration."""
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    port = free_port()
    receiver = subprocess.Popen([vmstate_cmd, "receive", "--bind", "127.0.0.1", "--port",
                                 str(port), "--run", "--once", "--root", str(directory)],
                                cwd=directory, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, bufsize=0)     # select-safe
    try:
        assert receiver.stderr.readline().startswith(b"Waiting for VM image")
        sender = subprocess.run([vmstate_cmd, "run", "--cpu", SENDER_CPU, "--memory", MEMORY,
                                 "--migrate-to",
                                 f"127.0.0.1:{port}", *(["--live"] if live else []), program,
                                 str(STEPS), str(SAVE_AT), str(rate_mib), str(BUFFER_MIB)],
                                cwd=directory, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, timeout=600)
        assert sender.returncode == 0 and "VM verified and started" in sender.stderr, \
            sender.stderr
        got = marks(_read_until(receiver.stderr, "first-kvm-run"))
    finally:
        receiver.kill()
        receiver.wait()
        receiver.stderr.close()
    sent = marks(sender.stderr)
    start = sent["live-start"] if live else sent["save-start"]
    downtime = (got["first-kvm-run"] - sent["save-start"]) / 1e9
    total = (got["first-kvm-run"] - start) / 1e9
    ratio = None
    if live:
        match = re.search(r"([\d.]+) MiB sent for ([\d.]+) MiB present", sender.stderr)
        ratio = float(match[1]) / float(match[2])
    return downtime, total, ratio


def test_live_migration(vmstate_cmd, guest, tmp_path):
    program = guest("live_counter")
    cold = [migrate_once(vmstate_cmd, program, tmp_path, 0, live=False) for _ in range(RUNS)]
    cold_total = statistics.median(total for _, total, _ in cold)
    rows = [(f"cold migration (idle guest, median of {RUNS})",
             f"downtime = total {cold_total * 1e3:.0f} ms")]
    for rate in (0, 16, 64, 256):
        results = [migrate_once(vmstate_cmd, program, tmp_path, rate, live=True)
                   for _ in range(RUNS)]
        downtime = statistics.median(d for d, _, _ in results)
        total = statistics.median(t for _, t, _ in results)
        ratio = statistics.median(r for _, _, r in results)
        rows.append((f"live, {'idle' if not rate else f'dirtying {rate} MiB/s'}",
                     f"downtime {downtime * 1e3:.0f} ms (runs: "
                     f"{', '.join(f'{d * 1e3:.0f}' for d, _, _ in results)}), total "
                     f"{total * 1e3:.0f} ms = {total / cold_total:.2f}x cold, "
                     f"{ratio:.2f}x present memory sent"))
    report(f"live migration of a 1 GiB guest ({BUFFER_MIB} MiB written) over loopback from "
           f"{SENDER_CPU}, medians of {RUNS}", rows)
