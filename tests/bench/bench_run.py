"""Cost of running guests: one system call round trip through the VMM, and `vmstate run`
of the hello example as a whole process. Run with `make bench`."""

import sys

import pytest

from benchlib import median_seconds, report

pytestmark = pytest.mark.kvm
CALLS = 20000


def test_syscall_round_trip(vmstate_cmd, guest):
    program = guest("syscall_loop")
    in_vm = (median_seconds([vmstate_cmd, "run", program, str(CALLS)], runs=5)
             - median_seconds([vmstate_cmd, "run", program, "0"], runs=5)) / CALLS
    native = (median_seconds([program, str(CALLS * 50)], runs=5)
              - median_seconds([program, "0"], runs=5)) / (CALLS * 50)
    report("guest system call round trip (getpid), median of 5 runs", [
        ("in the VM, serviced by the VMM", f"{in_vm * 1e6:.1f} us"),
        ("native on the host (baseline)", f"{native * 1e6:.3f} us"),
        ("ratio", f"{in_vm / native:.0f}x")])


def test_vmstate_run_hello(vmstate_cmd, example):
    program = example("hello")
    whole = median_seconds([vmstate_cmd, "run", program], runs=11)
    native = median_seconds([program], runs=11)
    python = median_seconds([sys.executable, "-c", "pass"], runs=11)
    report("`vmstate run examples/hello`, whole process, median of 11 runs", [
        ("vmstate run hello", f"{whole * 1e3:.1f} ms"),
        ("native ./hello (baseline)", f"{native * 1e3:.2f} ms"),
        ("python3 -c pass (interpreter start)", f"{python * 1e3:.1f} ms"),
        ("ratio to native", f"{whole / native:.0f}x")])
