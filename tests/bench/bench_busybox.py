"""Whole-process cost of unmodified busybox-static commands in the VM against the same
commands native, measured in the same run, and the cost of one served system call. Run with
`make bench`, or alone (no memory warm-up) with `python tests/bench/bench_busybox.py`."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from benchlib import median_seconds, report

pytestmark = pytest.mark.kvm
BUSYBOX = Path("/bin/busybox")
BIG_FILE_BYTES = 50 << 20
DD_BYTES = 20000


def _root(directory: Path) -> Path:
    root = directory / "root"
    root.mkdir()
    shutil.copy2(BUSYBOX, root / "busybox")
    with open(root / "big.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * (BIG_FILE_BYTES >> 20))
    return root


def measure(vmstate: str, directory: Path) -> None:
    root = _root(directory)
    vm = [vmstate, "run", "--root", str(root), str(root / "busybox")]
    native = [str(root / "busybox")]
    rows = []
    for label, args, native_args in (
            ("busybox md5sum of a 50 MB file", ["md5sum", "/big.bin"],
             ["md5sum", str(root / "big.bin")]),
            ("busybox true", ["true"], ["true"])):
        in_vm = median_seconds(vm + args, runs=5)
        base = median_seconds(native + native_args, runs=5)
        rows += [(f"{label}: in the VM", f"{in_vm * 1e3:.1f} ms"),
                 (f"{label}: native (baseline)", f"{base * 1e3:.2f} ms"),
                 (f"{label}: ratio", f"{in_vm / base:.1f}x")]
    dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1"]
    served = (median_seconds(vm + dd + [f"count={DD_BYTES}"], runs=5)
              - median_seconds(vm + dd + ["count=0"], runs=5)) / (2 * DD_BYTES)
    native_call = (median_seconds(native + dd + [f"count={DD_BYTES * 20}"], runs=5)
                   - median_seconds(native + dd + ["count=0"], runs=5)) / (40 * DD_BYTES)
    rows += [("one served call (read or write of 1 byte, busybox dd bs=1)",
              f"{served * 1e6:.1f} us"),
             ("the same call native (baseline)", f"{native_call * 1e6:.2f} us"),
             ("ratio", f"{served / native_call:.0f}x")]
    report("busybox-static in the VM against native, medians of 5 whole-process runs", rows)


@pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed")
def test_busybox_against_native(vmstate_cmd, tmp_path):
    measure(vmstate_cmd, tmp_path)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        measure(str(Path(sys.executable).parent / "vmstate"), Path(scratch))
