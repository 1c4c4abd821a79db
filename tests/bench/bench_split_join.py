"""split and join of images of 1 GiB and 4 GiB guests in the four layouts of
benchlib.LAYOUTS, as whole commands, against `cp --sparse=always` of the same image in the
same run (target: at most 1.1x its time), and against cp followed by sync (what waiting for
the disk would cost: split and join, like cp, do not fsync; README, "Durability"); and
join(split(image)) == image. Run with `make bench`."""

import statistics
import subprocess
import time

import pytest

from benchlib import (
    LAYOUTS, SIZES_MIB, cp_seconds, median_seconds, report, save_guest, stored_bytes)

pytestmark = pytest.mark.kvm
RUNS = 3


def seconds(command, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory_mib", SIZES_MIB)
def test_split_and_join(vmstate_cmd, example, tmp_path, memory_mib, layout):
    save_guest(vmstate_cmd, example("fill_memory"), layout, memory_mib, tmp_path)
    image = tmp_path / "vm_image.sav"
    split = statistics.median(seconds([vmstate_cmd, "split", "vm_image.sav"], tmp_path)
                              for _ in range(RUNS))
    join = statistics.median(seconds([vmstate_cmd, "join", "vm.core", "hw.xml", "-o",
                                      "joined.sav"], tmp_path) for _ in range(RUNS))
    same = (tmp_path / "joined.sav").read_bytes() == image.read_bytes()
    cp = cp_seconds(image, tmp_path, RUNS)
    cp_sync = cp_seconds(image, tmp_path, 1, sync=True)       # slow on a busy disk: once
    startup = median_seconds([vmstate_cmd, "split", "--help"], runs=RUNS, cwd=tmp_path)
    stored = stored_bytes(image)
    core = stored_bytes(tmp_path / "vm.core")
    report(f"split/join: {memory_mib} MiB guest, {layout}, {stored >> 20} MiB stored "
           f"(medians of {RUNS}, whole commands)", [
        ("vmstate split", f"{split * 1e3:.0f} ms"),
        ("vmstate join", f"{join * 1e3:.0f} ms"),
        ("baseline: cp --sparse=always of the image", f"{cp * 1e3:.0f} ms"),
        ("baseline: the same cp + sync of the copy (one run)", f"{cp_sync * 1e3:.0f} ms"),
        ("split / cp, join / cp (time; target <= 1.1)", f"{split / cp:.2f}x, {join / cp:.2f}x"),
        ("split / (cp + sync), join / (cp + sync)", f"{split / cp_sync:.2f}x, "
                                                    f"{join / cp_sync:.2f}x"),
        ("fixed cost in both: start-up (vmstate split --help)", f"{startup * 1e3:.0f} ms"),
        ("core on disk / image on disk", f"{core / stored:.3f}"),
        ("join(split(image)) == image", "yes" if same else "NO")])
    assert same
