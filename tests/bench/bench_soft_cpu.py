"""The software CPU (unicorn) beside KVM and native, in the same run: restore to the first
guest instruction (in-process, at several memory sizes), a served system call, and three
CPU-bound loops (integer chain, memory-heavy sieve, x87/SSE mix). Run with `make bench`."""

import statistics
import time

import pytest

from benchlib import median_seconds, report
from vmstate.units import parse_size

pytestmark = pytest.mark.kvm
CALLS = 20000
SOFT_CALLS = 200000
SIZES = ("64M", "1G", "4G", "16G", "64G")
LOOPS = (("integer chain, 100M steps", ["int", "100"]),
         ("sieve over 16 MiB (memory-heavy)", ["sieve", "16", "1"]),
         ("x87 + SSE mix, 10M steps", ["float", "10"]))


def _in_process_restore(path: str, cpu: str) -> tuple[float, float, float]:
    """Seconds to open the image, to build the machine over it, and to run its first
    instruction (soft) or be ready to enter KVM_RUN (kvm)."""
    from kvm_backend.vm import VirtualMachine, open_kvm
    from machine.base import check_restorable
    from machine.memory import GuestMemory
    from soft_backend.vm import NO_STOP_ADDRESS, SoftMachine
    from unicorn import x86_const as X
    from vmstate.image.reader import Image
    kvm = open_kvm() if cpu == "kvm" else None
    start = time.perf_counter()
    image = Image(path)
    opened = time.perf_counter()
    check_restorable(image.state)
    memory = GuestMemory(image.state.memory[0].size, image_fd=image.fd,
                         image_offset=image.region_data[0].data_offset)
    vm = (SoftMachine.restore(image.state, memory, "/tmp") if cpu == "soft" else
          VirtualMachine.restore(kvm, image.state, memory, "/tmp"))
    built = time.perf_counter()
    if cpu == "soft":
        vm.uc.emu_start(vm.uc.reg_read(X.UC_X86_REG_RIP), NO_STOP_ADDRESS, count=1)
    ran = time.perf_counter()
    vm.close()
    image.close()
    return opened - start, built - opened, ran - built


def _median_phases(path: str, cpu: str, runs: int = 11) -> list[float]:
    samples = [_in_process_restore(path, cpu) for _ in range(runs + 1)][1:]   # after a warm-up
    totals = sorted(range(runs), key=lambda i: sum(samples[i]))
    return list(samples[totals[runs // 2]])


def test_restore_to_first_instruction(vmstate_cmd, example, tmp_path):
    import subprocess
    rows = []
    for size in SIZES:
        image = tmp_path / f"{size}.sav"
        subprocess.run([vmstate_cmd, "run", "--cpu", "kvm", "--memory", size, "--image",
                        str(image), example("fill_memory"), "16"], check=True,
                       capture_output=True, cwd=tmp_path)
        for cpu in ("soft", "kvm"):
            opened, built, ran = _median_phases(str(image), cpu)
            rows.append((f"{size} image on {cpu}", f"{(opened + built + ran) * 1e3:6.2f} ms  "
                         f"(open image {opened * 1e3:.2f}, machine {built * 1e3:.2f}, first "
                         f"instruction {ran * 1e3:.2f})"))
    native = median_seconds([example("hello")], runs=11)
    rows.append(("native: ./hello as a whole process (baseline)", f"{native * 1e3:6.2f} ms"))
    report("restore to the first guest instruction, in-process, median of 11 (16 MiB touched)",
           rows)


def _memory_slot_seconds(kvm, size: int) -> float:
    """Seconds for KVM to create a VM and take a memory slot of `size` bytes (dirty-logged,
    as the VMM's), what bounds a KVM restore at large sizes on a shadow-paging host."""
    from kvm_backend import abi
    from machine.memory import GuestMemory
    memory = GuestMemory(size)
    try:
        start = time.perf_counter()
        vm = kvm.create_vm()
        vm.set_user_memory_region(0, 0, size, memory.host_address, abi.KVM_MEM_LOG_DIRTY_PAGES)
        elapsed = time.perf_counter() - start
        vm.close()
    finally:
        memory.close()
    return elapsed


def test_kvm_memory_slot_setup():
    from kvm_backend.vm import open_kvm
    kvm = open_kvm()
    rows = []
    for size in SIZES:
        seconds = statistics.median(_memory_slot_seconds(kvm, parse_size(size))
                                    for _ in range(7))
        rows.append((f"{size}: KVM_CREATE_VM + KVM_SET_USER_MEMORY_REGION",
                     f"{seconds * 1e3:6.2f} ms"))
    report("KVM's own part of a restore: the VM and its memory slot, median of 7", rows)


def _soft_run_seconds(program: str, calls: int) -> float:
    """In-process: boot the software CPU and run the getpid loop to its exit."""
    import os

    from linux_personality.options import GuestOptions
    from soft_backend.vm import SoftMachine
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved_stdout = os.dup(1)
    os.dup2(devnull, 1)                       # the guest's one line of output
    try:
        with SoftMachine.boot(program, [program, str(calls)], 64 << 20, "/tmp",
                              GuestOptions()) as vm:
            start = time.perf_counter()
            vm.run()
            return time.perf_counter() - start
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
        os.close(devnull)


def test_served_system_call(vmstate_cmd, guest):
    program = guest("syscall_loop")
    soft = (statistics.median(_soft_run_seconds(program, SOFT_CALLS) for _ in range(3))
            - statistics.median(_soft_run_seconds(program, 0) for _ in range(3))) / SOFT_CALLS
    command = [vmstate_cmd, "run", "--cpu", "kvm", program]
    kvm = (median_seconds(command + [str(CALLS)], runs=5)
           - median_seconds(command + ["0"], runs=5)) / CALLS
    native = (median_seconds([program, str(CALLS * 50)], runs=5)
              - median_seconds([program, "0"], runs=5)) / (CALLS * 50)
    report("a served system call (getpid): time for N calls less time for 0, per call", [
        (f"software CPU, in-process, {SOFT_CALLS} calls, median of 3", f"{soft * 1e6:.1f} us"),
        (f"KVM, whole process, {CALLS} calls, median of 5", f"{kvm * 1e6:.1f} us"),
        ("native on the host (baseline)", f"{native * 1e6:.3f} us"),
        ("software CPU / KVM", f"{soft / kvm:.2f}x")])


def test_cpu_bound_loops(vmstate_cmd, guest):
    program = guest("loops")
    rows = []
    for label, args in LOOPS:
        native = median_seconds([program, *args], runs=3)
        kvm = median_seconds([vmstate_cmd, "run", "--cpu", "kvm", program, *args], runs=3)
        soft = median_seconds([vmstate_cmd, "run", "--cpu", "soft", "--memory", "128M",
                               program, *args], runs=3)
        rows.append((label, f"native {native:.3f} s, KVM {kvm:.3f} s, soft {soft:.3f} s "
                     f"(soft/native {soft / native:.1f}x, soft/KVM {soft / kvm:.1f}x)"))
    report("CPU-bound guests, whole process, median of 3", rows)




def test_busybox_conformance_suite(vmstate_cmd, tmp_path):
    """The whole busybox conformance suite (tests/conformance.py), one pass each: natively,
    on KVM and on the software CPU, with how many cases gave Linux's results (exactly, and
    but for the stdout of the cases that differ by design, MUST_DIFFER)."""
    from tests.conformance import (CASES, MUST_DIFFER, compare, native_available, run_native,
                                   run_vm)
    if native_available() is not None:
        pytest.skip(native_available())
    rows, native = [], []
    start = time.perf_counter()
    for i, case in enumerate(CASES):
        native.append(run_native(case, tmp_path / f"native-{i}"))
    rows.append(("native", f"{time.perf_counter() - start:.1f} s"))
    for cpu in ("kvm", "soft"):
        start, exactly, alike = time.perf_counter(), 0, 0
        for i, case in enumerate(CASES):
            vm = run_vm(case, tmp_path / f"{cpu}-{i}", vmstate_cmd, cpu)
            exactly += not compare(native[i], vm)
            alike += not compare(native[i], vm, stdout_may_differ=case.name in MUST_DIFFER)
        rows.append((cpu, f"{time.perf_counter() - start:.1f} s ({alike}/{len(CASES)} cases "
                          f"as on Linux, {exactly} exactly)"))
    report(f"busybox conformance suite, {len(CASES)} commands, whole processes", rows)
