"""The software CPU (soft_backend, unicorn) against KVM: one image format for both, a running
guest moved between them with live x87/SSE state, open files and a pending read, a migration
from a KVM sender to a software receiver, and exact instruction counts."""

import os
import signal
import subprocess

import pytest

from helpers import wait_until_blocked
from vmstate.image.reader import Image

OTHER = {"kvm": "soft", "soft": "kvm"}
CROSS_OUTPUT = [f"step {n}: save returned 0, registers kept, file offset {4 * n}"
                for n in (1, 2, 3)]


@pytest.mark.kvm
@pytest.mark.parametrize("first", ["kvm", "soft"])
def test_a_guest_moves_between_cpus_at_every_save(vmstate, vmstate_cmd, guest, tmp_path, first):
    """kvm -> soft -> kvm -> soft -> kvm (and soft -> kvm -> ...): x87/SSE registers held
    across each SAVE, a file written at growing offsets, then a read left pending by a
    signal-requested save and completed on the other CPU."""
    cpus = [first, OTHER[first]] * 3
    step = vmstate("run", "--cpu", cpus[0], "--image", "0.sav", guest("cross_cpu"))
    assert step.returncode == 0, step.stderr
    lines = step.stdout.decode().splitlines()
    for n in (1, 2):
        step = vmstate("restore", "--cpu", cpus[n], "--image", f"{n}.sav", f"{n - 1}.sav")
        assert step.returncode == 0, step.stderr
        lines += step.stdout.decode().splitlines()
    # The guest prints its last step, then blocks reading an empty pipe: SIGUSR1 saves it.
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [vmstate_cmd, "restore", "--cpu", cpus[3], "--save-on-signal", "--image", "3.sav",
         "2.sav"], cwd=tmp_path, stdin=read_end, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    os.close(read_end)
    lines.append(process.stdout.readline().decode().rstrip("\n"))
    wait_until_blocked(process.pid)                   # now blocked reading stdin
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=60)
    os.close(write_end)
    assert process.returncode == 0, err
    with Image(str(tmp_path / "3.sav")) as image:
        assert image.state.vmm.pending is not None and image.state.vmm.pending.nr == 0   # read
        assert [f.offset for f in image.state.vmm.files if f.path == "cross.txt"] == [12]
    step = vmstate("restore", "--cpu", cpus[4], "3.sav", input=b"moved\n")
    assert step.returncode == 0, step.stderr
    lines += step.stdout.decode().splitlines()
    assert lines == CROSS_OUTPUT + ["read 6 bytes: moved"]
    assert (tmp_path / "cross.txt").read_bytes() == b"step" * 3


@pytest.mark.kvm
def test_a_kvm_sender_migrates_to_a_software_receiver(vmstate, vmstate_cmd, example, tmp_path):
    from test_migration import Receiver
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    receiver = Receiver(vmstate_cmd, receiver_dir, "--run", "--once", "--cpu", "soft",
                        "--root", tmp_path)
    try:
        sent = vmstate("run", "--cpu", "kvm", "--migrate-to", f"127.0.0.1:{receiver.port}",
                       example("lab_app"))
        assert sent.returncode == 0, sent.stderr
        assert "VM verified and started" in sent.stderr.decode()
        assert receiver.process.wait(timeout=60) == 0
        receiver.read_log_until("ended: exit status 0")
    finally:
        receiver.stop()
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


def _vcpu(path):
    with Image(str(path)) as image:
        vcpu = image.state.vcpus[0]
        return vcpu.regs, vcpu.xsave[:512], image.state.vmm.pending


@pytest.mark.parametrize("first,second", [(1, 1), (999, 1), (12345, 54321)])
def test_instruction_counts_are_exact(vmstate, guest, tmp_path, first, second):
    """From one saved start, running first+second instructions in one go leaves the guest
    exactly where running `first`, saving, restoring and running `second` more leaves it; and
    a second run of the same count lands on the same state.

    Every run continues the same start image, so all share its AT_RANDOM bytes: the stack
    canary musl derives from them sits in RDX inside syscall()'s epilogue, and where the stop
    lands depends on the length of the program's path (musl's start-up walks argv)."""
    args = ["--cpu", "soft", "--max-instructions"]
    start = vmstate("run", *args, "1", "--image", "start.sav", guest("syscall_loop"), "100000")
    assert start.returncode == 0, start.stderr
    for name, count, source in [("whole", first + second, "start"),
                                ("again", first + second, "start"),
                                ("part", first, "start"), ("rest", second, "part")]:
        step = vmstate("restore", *args, str(count), "--image", f"{name}.sav", f"{source}.sav")
        assert step.returncode == 0, step.stderr
    assert _vcpu(tmp_path / "whole.sav") == _vcpu(tmp_path / "again.sav")
    assert _vcpu(tmp_path / "whole.sav") == _vcpu(tmp_path / "rest.sav")
    assert _vcpu(tmp_path / "part.sav")[0] != _vcpu(tmp_path / "rest.sav")[0]


def test_one_instruction_moves_rip_by_one_instruction(vmstate, guest, tmp_path):
    """From the entry point, one instruction and then one more: RIP advances by the length of
    the instruction at the entry (decoded from the image)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    assert vmstate("run", "--cpu", "soft", "--max-instructions", "1", "--image", "1.sav",
                   guest("syscall_loop")).returncode == 0
    assert vmstate("restore", "--cpu", "soft", "--max-instructions", "1", "--image", "2.sav",
                   "1.sav").returncode == 0
    with Image(str(tmp_path / "1.sav")) as image:
        rip = image.state.vcpus[0].regs.rip
        code = image.read_phys(rip, 15)             # the guest's user memory is identity-mapped
    length = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, rip, 1)).size
    assert _vcpu(tmp_path / "2.sav")[0].rip == rip + length


def test_software_cpu_runs_without_kvm(vmstate, example, tmp_path):
    """The software CPU needs no /dev/kvm: the lab flow with KVM made unavailable."""
    no_kvm = {"VMSTATE_KVM_DEVICE": str(tmp_path / "no-kvm")}
    saved = vmstate("run", "--cpu", "soft", example("lab_app"), env=no_kvm)
    assert saved.returncode == 0, saved.stderr
    restored = vmstate("restore", "--cpu", "soft", "vm_image.sav", env=no_kvm)
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"



@pytest.mark.kvm
def test_both_cpus_write_the_same_sections_and_only_a_field_tells_them_apart(vmstate, example,
                                                                           tmp_path):
    sections = {}
    for cpu in ("kvm", "soft"):
        saved = vmstate("run", "--cpu", cpu, "--image", f"{cpu}.sav", example("lab_app"))
        assert saved.returncode == 0, saved.stderr
        with Image(str(tmp_path / f"{cpu}.sav")) as image:
            sections[cpu] = [(s.type, s.flags, s.instance) for s in image.sections]
            assert image.state.vmm.saved_by == cpu
        info = vmstate("info", f"{cpu}.sav")
        assert f"({cpu})" in [line for line in info.stdout.decode().splitlines()
                              if line.startswith("Saved by")][0]
    assert sections["kvm"] == sections["soft"]
    # split and join carry the field; the joined soft image finishes on KVM.
    assert vmstate("split", "soft.sav").returncode == 0
    assert 'saved-by="soft"' in (tmp_path / "hw.xml").read_text()
    assert vmstate("join", "vm.core", "hw.xml", "-o", "joined.sav").returncode == 0
    with Image(str(tmp_path / "joined.sav")) as image:
        assert image.state.vmm.saved_by == "soft"
    restored = vmstate("restore", "--cpu", "kvm", "joined.sav")
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


@pytest.mark.kvm
@pytest.mark.parametrize("fault", ["null", "kernel", "fetch", "ud2", "hlt", "cr0", "divide"])
def test_faults_are_reported_as_on_kvm(vmstate, guest, fault):
    """The same exit status and the same one-line report, byte for byte, on both CPUs."""
    results = {cpu: vmstate("run", "--cpu", cpu, guest("faults"), fault) for cpu in OTHER}
    assert results["kvm"].returncode > 128
    assert results["kvm"].stderr.decode().startswith("vmstate: guest fault: ")
    assert (results["soft"].returncode, results["soft"].stdout, results["soft"].stderr) == \
        (results["kvm"].returncode, results["kvm"].stdout, results["kvm"].stderr)


def test_a_host_slices_software_vms_by_instruction_count(vmstate, guest, tmp_path):
    """vm_exec_slice_in_instructions on the software CPU: two VMs interleave in slices of
    exactly that many instructions and keep their exit statuses (the default CPU is chosen
    as the software one, since only it counts)."""
    from test_host import switches, tagged
    (tmp_path / "vmm.conf").write_text(
        "vm_exec_slice_in_instructions = 200000\n"
        f"vm_binary = {guest('ticker')} 6 1 3\n"
        f"vm_binary = {guest('ticker')} 6 1 4\n")
    ran = vmstate("host", "--config", "vmm.conf")
    assert ran.returncode == 4, ran.stderr
    lines = tagged(ran.stdout)
    for name in ("ticker", "ticker-2"):
        assert [text for tag, text in lines if tag == name] == [f"tick {i}" for i in range(6)]
    assert switches([tag for tag, _ in lines]) >= 3, lines


@pytest.mark.kvm
def test_instruction_slices_are_refused_on_kvm_through_the_host_code_too(vmstate, guest,
                                                                          tmp_path):
    from helpers import one_line_error
    (tmp_path / "vmm.conf").write_text("vm_exec_slice_in_instructions = 1000\n"
                                       f"vm_binary = {guest('ticker')} 1 1 0\n")
    result = vmstate("host", "--cpu", "kvm", "--config", "vmm.conf")
    assert result.returncode == 2
    assert "--cpu soft" in one_line_error(result)


def test_the_dirty_log_of_the_software_cpu_misses_no_written_page(example, tmp_path):
    """start_tracking/take_dirty (a live migration's log, from the D bits of the guest's page
    tables) in-process: every page whose bytes changed while the guest ran is reported; a
    reported page the receiver did not have holds data (zero pages in a written 2 MiB entry
    are left out); the next take, with nothing run, reports nothing."""
    import numpy as np

    from machine.outcome import Exited
    from soft_backend.vm import SoftMachine
    program = example("fill_memory")
    with SoftMachine.boot(program, [program, "16", "every4"], 64 << 20, str(tmp_path)) as vm:
        present = vm.start_tracking()
        before = np.frombuffer(vm.memory.view, np.uint8).reshape(-1, 4096).copy()
        assert vm.run() == Exited(0)
        after = np.frombuffer(vm.memory.view, np.uint8).reshape(-1, 4096)
        dirty = vm.take_dirty()
        changed = (before != after).any(axis=1)
        assert changed.sum() > 1000                      # a quarter of 16 MiB, and more
        assert not (changed & (dirty == 0)).any()
        new = (dirty != 0) & (present == 0)
        assert after[new].any(axis=1).all()
        assert dirty.sum() < 2 * changed.sum()           # not every page of each 2 MiB entry
        assert not vm.take_dirty().any()
        vm.stop_tracking()


def test_live_migration_with_an_instruction_budget_is_refused(vmstate, guest):
    result = vmstate("run", "--cpu", "soft", "--live", "--migrate-to", "127.0.0.1:9",
                     "--max-instructions", "1000", guest("ticker"), "1", "1", "0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert lines == ["vmstate: --max-instructions saves at an exact instruction: it cannot end "
                     "in a live migration (leave out --live)"]


def test_a_page_swapped_or_in_migration_counts_as_written():
    """The software CPU finds written pages in /proc/self/pagemap. An anonymous page the
    kernel is moving (compaction) or has swapped out is a swap entry, without the present
    and exclusive bits: it holds the guest's data and must be saved (counting only present
    pages lost 34 pages of a save once, under memory pressure). Entries as
    Documentation/admin-guide/mm/pagemap.rst lays them out."""
    import numpy as np
    from soft_backend.written import EXCLUSIVE, FILE_OR_SHARED, PRESENT, SWAPPED, private_pages
    entries = np.array([0,                                   # never touched
                        PRESENT | EXCLUSIVE | 0x1234,         # written here
                        PRESENT | FILE_OR_SHARED,             # read from the image file
                        PRESENT,                              # shared with a forked copy
                        SWAPPED | 0x5678,                     # anonymous, being moved
                        SWAPPED | FILE_OR_SHARED],            # a file page being moved
                       dtype=np.uint64)
    assert private_pages(entries).tolist() == [False, True, False, False, True, False]
