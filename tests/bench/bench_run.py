"""Cost of running guests: a system call round trip through the VMM beside a bare exit round
trip, and the whole-process start-up of `vmstate run` and `vmstate restore` of guests that exit
at once, against `python3 -c pass` in the same run. Run with `make bench`."""

import sys

import pytest

from benchlib import interleaved_medians, median_seconds, report, save_guest

pytestmark = pytest.mark.kvm
CALLS = 20000


def per_call(vmstate_cmd, program: str) -> float:
    """Seconds per iteration of a guest loop: N iterations less none, over N."""
    return (median_seconds([vmstate_cmd, "run", program, str(CALLS)], runs=5)
            - median_seconds([vmstate_cmd, "run", program, "0"], runs=5)) / CALLS


def test_syscall_round_trip(vmstate_cmd, guest):
    serviced = per_call(vmstate_cmd, guest("syscall_loop"))
    bare = per_call(vmstate_cmd, guest("doorbell_loop"))
    program = guest("syscall_loop")
    native = (median_seconds([program, str(CALLS * 50)], runs=5)
              - median_seconds([program, "0"], runs=5)) / (CALLS * 50)
    report("guest system call round trip (getpid), median of 5 runs", [
        ("in the VM, serviced by the VMM", f"{serviced * 1e6:.1f} us"),
        ("baseline: bare exit round trip (a store to the spare doorbell, not serviced)",
         f"{bare * 1e6:.1f} us"),
        ("serviced / bare (target <= 1.5)", f"{serviced / bare:.2f}x"),
        ("native on the host", f"{native * 1e6:.3f} us")])


def test_start_up(vmstate_cmd, example, guest, tmp_path):
    save_guest(vmstate_cmd, example("fill_memory"), "contiguous quarter", 64, tmp_path,
               exit_at_once=True)
    medians = interleaved_medians({
        "python": [sys.executable, "-c", "pass"],
        "run": [vmstate_cmd, "run", guest("exit_now")],
        "restore": [vmstate_cmd, "restore", "vm_image.sav"],
        "run --help": [vmstate_cmd, "run", "--help"],
        "info": [vmstate_cmd, "info", "vm_image.sav"],
        "split": [vmstate_cmd, "split", "vm_image.sav"],        # writes vm.core, hw.xml
        "join": [vmstate_cmd, "join", "vm.core", "hw.xml", "-o", "joined.sav"]},
        runs=11, cwd=tmp_path)
    python = medians["python"]

    def against_python(name: str, target: str = "") -> str:
        return f"{medians[name] * 1e3:.1f} ms, {medians[name] / python:.2f}x{target}"
    report("start-up, whole process, median of 11 interleaved runs", [
        ("baseline: python3 -c pass (the same interpreter)", f"{python * 1e3:.1f} ms"),
        ("vmstate run of a program that exits at once", against_python("run", " (target <= 4)")),
        ("vmstate restore of a 64 MiB guest that exits at once",
         against_python("restore", " (target <= 4)")),
        ("vmstate run --help (interpreter and command line only)", against_python("run --help")),
        *((f"vmstate {command} of that 64 MiB image (16 MiB stored)", against_python(command))
          for command in ("info", "split", "join"))])
