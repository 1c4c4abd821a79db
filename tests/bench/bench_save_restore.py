"""SAVE and RESTORE of guests with 1 GiB and 4 GiB of memory in the four layouts of
benchlib.LAYOUTS (a contiguous quarter, one page in four, a random quarter, all of it).

- save: from the guest's SAVE request to the renamed, fsynced image, against
  `cp --sparse=always` of the image it wrote (and cp followed by sync of the copy);
- restore of a guest that exits at once, whole process, at 1 GiB against 64 MiB in the same
  layout (target: at most 1.3x);
- at 4 GiB fully written: process start to the first guest instruction, to the end of the
  memory verification, and to the first served system call, which waits for it.
Run with `make bench`. The VMM prints CLOCK_MONOTONIC marks when VMSTATE_TIMING=1."""

import os
import statistics
import subprocess
import time

import pytest

from benchlib import (
    LAYOUTS, SIZES_MIB, cp_seconds, median_seconds, report, save_guest, stored_bytes,
    timing_marks)

pytestmark = pytest.mark.kvm
RUNS = 3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory_mib", SIZES_MIB)
def test_save(vmstate_cmd, example, tmp_path, memory_mib, layout):
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    saves = []
    for _ in range(RUNS):
        m = timing_marks(save_guest(vmstate_cmd, example("fill_memory"), layout, memory_mib,
                                    tmp_path, env=env).stderr)
        saves.append((m["save-done"] - m["save-start"]) / 1e9)
    image = tmp_path / "vm_image.sav"
    stored = stored_bytes(image)
    save = statistics.median(saves)
    cp = cp_seconds(image, tmp_path, RUNS)
    cp_sync = cp_seconds(image, tmp_path, RUNS, sync=True)
    gib = stored / 2**30
    report(f"save: {memory_mib} MiB guest, {layout}, {stored >> 20} MiB stored (medians of "
           f"{RUNS})", [
        ("save: SAVE request -> image renamed and fsynced", f"{save * 1e3:.0f} ms, "
                                                           f"{gib / save:.2f} GiB/s"),
        ("baseline: cp --sparse=always of the image", f"{cp * 1e3:.0f} ms"),
        ("baseline: the same cp + sync of the copy", f"{cp_sync * 1e3:.0f} ms"),
        ("save / cp (time; target <= 1.0)", f"{save / cp:.2f}x"),
        ("save / (cp + sync) (time)", f"{save / cp_sync:.2f}x")])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_of_a_guest_that_exits_at_once(vmstate_cmd, example, tmp_path, layout):
    times = {}
    for memory_mib in (64, 1024):
        name = f"exit-{memory_mib}.sav"
        save_guest(vmstate_cmd, example("fill_memory"), layout, memory_mib, tmp_path,
                   exit_at_once=True, image=name)
        times[memory_mib] = median_seconds([vmstate_cmd, "restore", name], runs=7, cwd=tmp_path)
    report(f"restore of a guest that exits at once, {layout}, whole process (medians of 7)", [
        ("64 MiB guest", f"{times[64] * 1e3:.1f} ms"),
        ("1 GiB guest", f"{times[1024] * 1e3:.1f} ms"),
        ("1 GiB / 64 MiB (target <= 1.3)", f"{times[1024] / times[64]:.2f}x")])


def test_first_served_call_at_4_gib_fully_written(vmstate_cmd, example, tmp_path):
    save_guest(vmstate_cmd, example("fill_memory"), "fully written", 4096, tmp_path,
               exit_at_once=True)
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    rows = {"first guest instruction": [], "memory checksums verified": [],
            "first system call served": [], "process exit": []}
    for _ in range(RUNS):
        start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        result = subprocess.run([vmstate_cmd, "restore", "vm_image.sav"], cwd=tmp_path, env=env,
                                capture_output=True, check=True)
        end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        m = timing_marks(result.stderr)
        for label, mark in (("first guest instruction", m["first-kvm-run"]),
                            ("memory checksums verified", m["memory-verified"]),
                            ("first system call served", m["gate-passed"]),
                            ("process exit", end)):
            rows[label].append((mark - start) / 1e6)
    stored = stored_bytes(tmp_path / "vm_image.sav")
    report(f"restore of a 4 GiB guest, fully written ({stored >> 20} MiB stored), that exits "
           f"at once: process start -> (medians of {RUNS})",
           [(label, f"{statistics.median(values):.0f} ms") for label, values in rows.items()]
           + [("bound", "the first call waits for the memory checksums (every stored byte "
                        "hashed from the image's page cache or disk)")])
