"""Several VMs on one VMM (`vmstate host`): what a time slice costs, and how evenly N busy
VMs share the CPU. Run with `make bench`, or alone:
    .venv/bin/python -m pytest tests/bench/bench_host.py -s -p no:cacheprovider
"""

from __future__ import annotations

import re
import resource
import statistics
import subprocess

import pytest

from benchlib import report

pytestmark = pytest.mark.kvm
SPIN_MILLIONS = "1500"          # each spinning VM's work: 1.5e9 increments, no system calls
BUSY_SECONDS = "5"
RUNS = 3


@pytest.fixture(scope="session", autouse=True)
def warm_memory():
    """These figures are CPU time only: skip the session's 14 GiB memory warm-up."""


def host(vmstate_cmd, slice_ms: int, *commands: str) -> tuple[float, dict[str, tuple[int, float]], str]:
    """Run `vmstate host` on these VMs: its CPU seconds (user + system, the guests' time
    included; unlike wall time it does not count waiting for a CPU on a loaded machine),
    {name: (slices, run seconds)}, stdout."""
    command = [vmstate_cmd, "host", "--slice-ms", str(slice_ms)]
    for vm in commands:
        command += ["-v", vm]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, check=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    table = {m[1]: (int(m[2]), float(m[3])) for m in re.finditer(
        r"^  (\S+) .*\((\d+) slices, ([\d.]+) s\)$", done.stderr, re.M)}
    return cpu, table, done.stdout


def test_cost_of_a_slice_switch(vmstate_cmd, guest):
    spin = f"{guest('spin')} {SPIN_MILLIONS}"
    rows = []
    for vms in (1, 2):
        runs = {slice_ms: [host(vmstate_cmd, slice_ms, *[spin] * vms) for _ in range(3)]
                for slice_ms in (1000, 1)}
        cpu = {ms: statistics.median(r[0] for r in result) for ms, result in runs.items()}
        slices = {ms: statistics.median(sum(s for s, _ in r[1].values()) for r in result)
                  for ms, result in runs.items()}
        cost = (cpu[1] - cpu[1000]) / (slices[1] - slices[1000])
        rows += [(f"{vms} VM(s), 1000 ms slices (baseline)", f"{cpu[1000]:.3f} s CPU, "
                  f"{slices[1000]:.0f} slices"),
                 (f"{vms} VM(s), 1 ms slices", f"{cpu[1]:.3f} s CPU, {slices[1]:.0f} slices"),
                 (f"{vms} VM(s), cost of one slice end + switch", f"{cost * 1e6:.1f} us "
                  f"({cost / 1e-3 * 100:.1f}% of a 1 ms slice)")]
    report(f"slice switch: VMs spinning {SPIN_MILLIONS}M iterations each, median of 3 runs", rows)


def test_cpu_share_of_busy_vms(vmstate_cmd, guest):
    """Each VM counts for BUSY_SECONDS from its first slice; they start one slice apart, so
    the last ones run a little alone at the end (at most (N-1) slices of BUSY_SECONDS)."""
    busy = f"{guest('busy')} {BUSY_SECONDS}"
    alone, _, out = host(vmstate_cmd, 10, busy)
    alone_chunks = int(re.search(r"chunks (\d+)", out)[1])
    rows = [("1 busy VM alone (baseline)", f"{alone_chunks} chunks of work, {alone:.2f} s CPU")]
    for count in (2, 4):
        for slice_ms in (10, 50):
            work, times, total = [], [], []
            for _ in range(RUNS):
                cpu, table, out = host(vmstate_cmd, slice_ms, *[busy] * count)
                chunks = [int(n) for n in re.findall(r"chunks (\d+)", out)]
                assert len(chunks) == count, out
                seconds = [run for _, run in table.values()]
                work.append(max(chunks) / min(chunks))
                times.append(max(seconds) / min(seconds))
                total.append(sum(chunks) / alone_chunks)
            rows.append((f"{count} busy VMs, {slice_ms} ms slices",
                         f"work max/min {statistics.median(work):.3f}, time in slices max/min "
                         f"{statistics.median(times):.3f}; together "
                         f"{statistics.median(total):.2f}x the work of one alone"))
    report(f"CPU share of N VMs each counting for {BUSY_SECONDS} s of wall time, median of "
           f"{RUNS} runs", rows)
