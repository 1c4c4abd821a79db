"""split and join of a QEMU 7.2 stream of a 1 GiB guest whose RAM is all written, as whole
commands, against copying the same stream in the same run: `cp`, `cp --sparse=always`, and `cp`
plus a sync of the copy (split and join, like cp, do not fsync their outputs: README,
"Durability"; the synced cp shows what waiting for the disk costs). Each command writes its
outputs under new names, the previous round's removed (untimed) first: replacing a 1 GiB file
costs freeing it, and on ext4 a rename over an existing file first writes the new one out, a
cost that depends on how the file is replaced rather than on how fast it was made. Before each
command, untimed, the page cache's dirty data is written back: without that a command shares
the two CPUs with the writeback of the gigabyte the command before it wrote. Runs are
interleaved so that load from other processes falls on all of them alike; the load average is
printed with the figures. Single runs here still vary up to several times the median (the host
backs this microVM's memory and disk as it can; even cp's runs fall in two groups, about 0.3 s
and 0.55 s), so the ratio of each command's fastest run to cp's is printed too: both
undisturbed. VMSTATE_BENCH_SAMPLES=1 prints every run. Run with `make bench`."""

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchlib import report

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
import qemu_vm  # noqa: E402

RUNS = 9


def seconds(command, cwd, outputs=()) -> float:
    """Wall time of `command`, after (untimed) removing its `outputs` and writing back what
    earlier commands left dirty in the page cache."""
    for name in outputs:
        (cwd / name).unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_split_and_join_of_a_1g_all_written_guest(vmstate_cmd, tmp_path):
    subprocess.run(["make", "-s", "-C", str(REPO / "examples" / "qemu_guest")], check=True)
    qemu_vm.save_running_guest(tmp_path / "vm.state", "pc", "1G", tmp_path / "serial.log",
                               fill=True)
    size = (tmp_path / "vm.state").stat().st_size
    cp, cp_sparse, cp_sync, split, join = [], [], [], [], []
    copy = ("copy.state",)
    steps = [
        [(cp, ["sh", "-c", "cp vm.state copy.new && mv copy.new copy.state"], copy)],
        [(cp_sparse, ["sh", "-c", "cp --sparse=always vm.state copy.new && "
                      "mv copy.new copy.state"], copy)],
        [(cp_sync, ["sh", "-c", "cp vm.state copy.new && sync copy.new && "
                    "mv copy.new copy.state"], copy)],
        [(split, [vmstate_cmd, "split", "vm.state"], ("vm.core", "hw.xml")),
         (join, [vmstate_cmd, "join", "vm.core", "hw.xml", "-o", "new.state"],
          ("new.state",))]]
    for round_ in range(RUNS):
        for step in steps[round_ % len(steps):] + steps[:round_ % len(steps)]:
            for times, command, outputs in step:
                times.append(seconds(command, tmp_path, outputs))
    fastest = {name: min(times) for name, times in (("cp", cp), ("split", split),
                                                      ("join", join))}
    if os.environ.get("VMSTATE_BENCH_SAMPLES"):
        for name, times in (("cp", cp), ("split", split), ("join", join)):
            print(name, [round(t * 1e3) for t in times])
    same = (tmp_path / "new.state").read_bytes() == (tmp_path / "vm.state").read_bytes()
    load = os.getloadavg()
    cp, cp_sparse, cp_sync, split, join = (statistics.median(x) for x in
                                           (cp, cp_sparse, cp_sync, split, join))
    gib = size / (1 << 30)
    report(f"QEMU pc stream, 1 GiB guest, all RAM written ({size / 1e9:.2f} GB; medians of "
           f"{RUNS}, whole commands; load average {load[0]:.1f} {load[1]:.1f} "
           f"{load[2]:.1f} on {os.cpu_count()} CPUs)", [
        ("vmstate split", f"{split * 1e3:.0f} ms, {gib / split:.2f} GiB/s"),
        ("vmstate join", f"{join * 1e3:.0f} ms, {gib / join:.2f} GiB/s"),
        ("baseline: cp of the stream", f"{cp * 1e3:.0f} ms, {gib / cp:.2f} GiB/s"),
        ("baseline: cp --sparse=always of the stream", f"{cp_sparse * 1e3:.0f} ms"),
        ("baseline: cp + sync of the copy", f"{cp_sync * 1e3:.0f} ms"),
        ("split time / cp time", f"{split / cp:.2f}"),
        ("join time / cp time", f"{join / cp:.2f}"),
        ("split time / cp --sparse=always time", f"{split / cp_sparse:.2f}"),
        ("join time / cp --sparse=always time", f"{join / cp_sparse:.2f}"),
        ("split time / (cp + sync) time", f"{split / cp_sync:.2f}"),
        ("join time / (cp + sync) time", f"{join / cp_sync:.2f}"),
        ("fastest runs: split / cp", f"{fastest['split'] / fastest['cp']:.2f} "
                                     f"({fastest['split'] * 1e3:.0f} / {fastest['cp'] * 1e3:.0f} ms)"),
        ("fastest runs: join / cp", f"{fastest['join'] / fastest['cp']:.2f} "
                                    f"({fastest['join'] * 1e3:.0f} / {fastest['cp'] * 1e3:.0f} ms)"),
        ("join(split(stream)) == stream", "yes" if same else "NO")])
