"""SAVE and RESTORE at 64 MiB, 1 GiB and 4 GiB of guest memory, a quarter of it touched.

- restore: process start to the first KVM_RUN (the first guest instruction), and to the
  end of the memory verification that runs beside the guest (no exit is serviced before);
- save: guest memory written per second, from the guest's SAVE request to the renamed,
  fsynced image, against `cp --sparse=always` of the same image (and cp followed by sync);
- image size on disk against the touched memory.
Run with `make bench`. The VMM prints CLOCK_MONOTONIC marks when VMSTATE_TIMING=1."""

import os
import statistics
import subprocess
import time

import pytest

from benchlib import median_seconds, report

pytestmark = pytest.mark.kvm
SIZES = [(64, 16), (1024, 256), (4096, 1024)]       # memory MiB, touched MiB
RUNS = 5


def marks(result) -> dict[str, int]:
    found = {}
    for line in result.stderr.decode().splitlines():
        if line.startswith("vmstate-timing "):
            _, label, value = line.split()
            found[label] = int(value)
    return found


def timed(command, cwd, env):
    start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=True)
    return start, marks(result)


@pytest.mark.parametrize("memory_mib, touched_mib", SIZES)
def test_save_and_restore(vmstate_cmd, example, tmp_path, memory_mib, touched_mib):
    env = {**os.environ, "VMSTATE_TIMING": "1"}
    run = [vmstate_cmd, "run", "--memory", f"{memory_mib}M", example("fill_memory"),
           str(touched_mib)]
    save_seconds = []
    for _ in range(RUNS):
        _, m = timed(run, tmp_path, env)
        save_seconds.append((m["save-done"] - m["save-start"]) / 1e9)
    image = tmp_path / "vm_image.sav"
    stored = image.stat().st_blocks * 512
    touched = touched_mib << 20

    first_instruction, first_exit = [], []
    for _ in range(RUNS):
        start, m = timed([vmstate_cmd, "restore", "vm_image.sav"], tmp_path, env)
        first_instruction.append((m["first-kvm-run"] - start) / 1e6)
        first_exit.append((m["memory-verified"] - start) / 1e6)

    # Like a save, the copy goes to a new file while the previous one still exists, and
    # then replaces it (overwriting in place would recycle the old copy's page cache).
    copy, fresh = tmp_path / "copy.sav", tmp_path / "copy.new"
    cp = median_seconds(["sh", "-c", f"cp --sparse=always {image} {fresh} && mv {fresh} {copy}"],
                        runs=RUNS)
    cp_sync = median_seconds(["sh", "-c", f"cp --sparse=always {image} {fresh} && sync {fresh} "
                              f"&& mv {fresh} {copy}"], runs=RUNS)
    save = statistics.median(save_seconds)
    gib = touched / 2**30
    report(f"{memory_mib} MiB guest, {touched_mib} MiB touched (medians of {RUNS})", [
        ("restore: start -> first guest instruction", f"{statistics.median(first_instruction):.1f} ms"),
        ("restore: start -> memory checksums verified (in parallel)",
         f"{statistics.median(first_exit):.1f} ms"),
        ("save: SAVE request -> image renamed and fsynced", f"{save * 1e3:.1f} ms, "
                                                           f"{gib / save:.2f} GiB/s"),
        ("baseline: cp --sparse=always of the image to a new file",
         f"{cp * 1e3:.1f} ms, {gib / cp:.2f} GiB/s"),
        ("baseline: the same cp + sync of the copy", f"{cp_sync * 1e3:.1f} ms, {gib / cp_sync:.2f} GiB/s"),
        ("save / cp", f"{cp / save:.2f}x the throughput"),
        ("save / (cp + sync)", f"{cp_sync / save:.2f}x the throughput"),
        ("image on disk / touched memory", f"{stored / touched:.3f} ({stored >> 20} MiB)")])
