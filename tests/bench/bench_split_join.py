"""split and join of 1 GiB and 4 GiB images with a quarter of memory touched, as whole
commands, against `cp --sparse=always` of the same image in the same run; and the core's
size on disk against the touched memory. Run with `make bench`."""

import statistics
import subprocess
import time

import pytest

from benchlib import median_seconds, report

pytestmark = pytest.mark.kvm
RUNS = 5


def seconds(command, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.mark.parametrize("memory_mib, touched_mib", [(1024, 256), (4096, 1024)])
def test_split_and_join(vmstate_cmd, example, tmp_path, memory_mib, touched_mib):
    subprocess.run([vmstate_cmd, "run", "--memory", f"{memory_mib}M", example("fill_memory"),
                    str(touched_mib)], cwd=tmp_path, check=True, capture_output=True)
    split = statistics.median(seconds([vmstate_cmd, "split", "vm_image.sav"], tmp_path)
                              for _ in range(RUNS))
    join = statistics.median(seconds([vmstate_cmd, "join", "vm.core", "hw.xml", "-o",
                                      "joined.sav"], tmp_path) for _ in range(RUNS))
    same = (tmp_path / "joined.sav").read_bytes() == (tmp_path / "vm_image.sav").read_bytes()
    cp = median_seconds(["sh", "-c", "cp --sparse=always vm_image.sav copy.new && "
                         "mv copy.new copy.sav"], runs=RUNS, cwd=tmp_path)
    startup = median_seconds([vmstate_cmd, "split", "--help"], runs=RUNS, cwd=tmp_path)
    core = tmp_path / "vm.core"
    on_disk = core.stat().st_blocks * 512
    gib = touched_mib / 1024
    report(f"{memory_mib} MiB image, {touched_mib} MiB touched (medians of {RUNS}, whole "
           "commands)", [
        ("vmstate split", f"{split * 1e3:.0f} ms, {gib / split:.2f} GiB/s"),
        ("vmstate join", f"{join * 1e3:.0f} ms, {gib / join:.2f} GiB/s"),
        ("baseline: cp --sparse=always of the image", f"{cp * 1e3:.0f} ms, {gib / cp:.2f} GiB/s"),
        ("split / cp", f"{cp / split:.2f}x the throughput"),
        ("join / cp", f"{cp / join:.2f}x the throughput"),
        ("fixed cost: start-up (vmstate split --help)", f"{startup * 1e3:.0f} ms"),
        ("split / cp, start-up excluded", f"{cp / (split - startup):.2f}x the throughput"),
        ("join / cp, start-up excluded", f"{cp / (join - startup):.2f}x the throughput"),
        ("core on disk / touched memory", f"{on_disk / (touched_mib << 20):.3f} "
                                          f"({on_disk >> 20} MiB, apparent {core.stat().st_size >> 20} MiB)"),
        ("join(split(image)) == image", "yes" if same else "NO")])
