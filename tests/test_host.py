"""Several VMs in one VMM (`vmstate host`): interleaved tagged output, each VM's own exit
status, a VM from a snapshot next to fresh ones, a VM that faults or saves ending alone,
and the configuration file (good and bad lines, command-line overrides)."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from helpers import one_line_error
from vmstate.errors import UsageError
from vmstate.vmm_config import DEFAULT_MEMORY, VmEntry, complete, parse


def tagged(stdout: bytes) -> list[tuple[str, str]]:
    """(tag, text) of each output line, which must all be tagged."""
    lines = []
    for line in stdout.decode().splitlines():
        assert line.startswith("["), line
        tag, _, text = line[1:].partition("] ")
        lines.append((tag, text))
    return lines


def switches(tags: list[str]) -> int:
    return sum(1 for a, b in zip(tags, tags[1:]) if a != b)


def summary(stderr: bytes) -> dict[str, str]:
    """name -> its summary line's rest, from the `N VMs ended:` table."""
    lines = stderr.decode().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("VMs ended:"))
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines[start + 1:]}


@pytest.mark.kvm
def test_two_vms_interleave_and_keep_their_exit_statuses(vmstate, guest):
    ran = vmstate("host", "--slice-ms", "2", "-v", f"{guest('ticker')} 8 30 3",
                  "-v", f"{guest('ticker')} 8 30 4")
    assert ran.returncode == 4, ran.stderr           # the largest status
    lines = tagged(ran.stdout)
    for name in ("ticker", "ticker-2"):
        assert [text for tag, text in lines if tag == name] == [f"tick {i}" for i in range(8)]
    assert switches([tag for tag, _ in lines]) >= 3, lines
    table = summary(ran.stderr)
    assert table["ticker"].startswith("status 3") and table["ticker-2"].startswith("status 4")


@pytest.mark.kvm
def test_three_vms_each_with_its_status(vmstate, guest, example):
    ran = vmstate("host", "-v", f"{guest('ticker')} 4 20 0", "-v", f"{example('hello')} x",
                  "-v", f"{guest('ticker')} 4 20 9")
    assert ran.returncode == 9, ran.stderr
    lines = tagged(ran.stdout)
    assert ("hello", "arg 1: x") in lines
    assert len([1 for tag, _ in lines if tag == "ticker"]) == 4
    assert len([1 for tag, _ in lines if tag == "ticker-2"]) == 4
    table = summary(ran.stderr)
    assert [table[n].split()[1] for n in ("ticker", "hello", "ticker-2")] == ["0", "0", "9"]


@pytest.mark.kvm
def test_a_vm_from_a_snapshot_next_to_a_fresh_one(vmstate, guest):
    assert vmstate("run", guest("paracalls")).returncode == 3      # writes snap.sav
    ran = vmstate("host", "-v", f"{guest('ticker')} 3 10 5", "-s", "snap.sav")
    assert ran.returncode == 7, ran.stderr
    lines = tagged(ran.stdout)
    assert [text for tag, text in lines if tag == "snap"] == [
        "snapshot=1", "restored copy, marker original"]
    assert [text for tag, text in lines if tag == "ticker"] == ["tick 0", "tick 1", "tick 2"]
    table = summary(ran.stderr)
    assert table["snap"].startswith("status 7") and table["ticker"].startswith("status 5")


@pytest.mark.kvm
def test_a_faulting_and_a_saving_vm_end_alone(vmstate, guest, example, tmp_path):
    ran = vmstate("host", "-v", guest("null_deref"), "-v", example("lab_app"),
                  "-v", f"{guest('ticker')} 5 20 0")
    assert ran.returncode == 139, ran.stderr
    err = ran.stderr.decode()
    assert "[null_deref] guest fault: #PF" in err
    assert "[lab_app] saved to lab_app.sav" in err
    assert [text for tag, text in tagged(ran.stdout) if tag == "ticker"] == [
        f"tick {i}" for i in range(5)]
    restored = vmstate("restore", "lab_app.sav")
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


@pytest.mark.kvm
def test_dump_processor_state_is_tagged_with_the_vm_name(vmstate, guest):
    ran = vmstate("host", "-v", guest("paracalls"), "-v", f"{guest('ticker')} 1 1 0")
    assert ran.returncode == 3, ran.stderr
    dump = [line for line in ran.stderr.decode().splitlines() if line.startswith("[paracalls] ")]
    assert any("cr0 0x80010033" in line for line in dump), dump


# -- the configuration file --------------------------------------------------------------------

@pytest.mark.kvm
def test_config_file_runs_its_vms_and_the_command_line_overrides_it(vmstate, guest, tmp_path):
    (tmp_path / "vmm.conf").write_text(
        "# two VMs\n"
        "vm_exec_slice_ms = 3\n"
        "vm_memory = 16M          # too small for big_bss\n"
        f"vm_binary = {guest('big_bss')}\n"
        "vm_name = big\n"
        f"vm_binary = \"{guest('ticker')}\" 2 5 6\n"
        "vm_root = .\n")
    small = vmstate("host", "--config", "vmm.conf")
    assert small.returncode == 126, small.stderr            # the program does not fit
    assert one_line_error(small).startswith("vmstate: VM big (vmm.conf:4): ")
    ran = vmstate("host", "--config", "vmm.conf", "--memory", "128M")
    assert ran.returncode == 6, ran.stderr
    table = summary(ran.stderr)
    assert table["big"].startswith("status 0") and table["ticker"].startswith("status 6")


@pytest.mark.parametrize("text, line, message", [
    ("vm_exec_slice_ms = 10\nbogus = 1\n", 2, "unknown key 'bogus'"),
    ("\n# c\nvm_exec_slice_ms = 0\n", 3, "0 ms is not between 1 and 60000"),
    ("vm_exec_slice_ms = ten\n", 1, "'ten' is not a whole number of milliseconds"),
    ("vm_binary = a\nvm_memory = 1K\n", 2, "memory 1K is not between 8 MiB and 64 GiB"),
    ("vm_binary = a\nvm_memory = lots\n", 2, "bad size 'lots'"),
    ("vm_binary = a\nvm_root = x\nvm_root = y\n", 3, "vm_root given twice"),
    ("vm_binary = 'a\n", 1, "No closing quotation"),
    ("vm_binary =\n", 1, "no program given"),
    ("just words\n", 1, "expected KEY = VALUE"),
    ("vm_name = a b\n", 1, "VM name 'a b'"),
])
def test_bad_config_lines_name_file_and_line(text, line, message):
    with pytest.raises(UsageError) as raised:
        parse(text, "vmm.conf")
    assert str(raised.value).startswith(f"vmm.conf:{line}: "), raised.value
    assert message in str(raised.value)


def test_good_config_lines_and_defaults():
    config = parse("vm_exec_slice_ms = 7\ncontrol = /tmp/x.sock\nvm_root = shared\n"
                   "vm_binary = prog 'a b' c   # comment\nvm_memory = 32M\n"
                   "vm_snapshot = dir/old.sav\nvm_image = again.sav\nvm_binary = prog\n",
                   "f.conf")
    assert config.slice_ms == 7 and config.control == "/tmp/x.sock"
    vms = complete(list(config.vms), config.defaults)
    assert [(v.name, v.argv, v.snapshot, v.root, v.memory, v.image) for v in vms] == [
        ("prog", ("prog", "a b", "c"), None, "shared", 32 << 20, "prog.sav"),
        ("old", (), "dir/old.sav", "shared", DEFAULT_MEMORY, "again.sav"),
        ("prog-2", ("prog",), None, "shared", DEFAULT_MEMORY, "prog-2.sav")]
    assert complete([VmEntry(program="p", argv=("p",))], VmEntry())[0].root == "."


def test_bad_config_refused_in_one_line(vmstate, tmp_path):
    (tmp_path / "vmm.conf").write_text("vm_binary = x\nvm_slice = 3\n")
    line = one_line_error(vmstate("host", "--config", "vmm.conf"))
    assert line.startswith("vmstate: vmm.conf:2: unknown key 'vm_slice'")
    missing = vmstate("host", "--config", "nothere.conf")
    assert missing.returncode == 127 and one_line_error(missing).endswith("no such file")


def test_slices_counted_in_instructions_are_refused_on_kvm(vmstate, tmp_path):
    (tmp_path / "vmm.conf").write_text("vm_exec_slice_in_instructions = 100000\n"
                                       "vm_binary = x\n")
    result = vmstate("host", "--cpu", "kvm", "--config", "vmm.conf")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "vm_exec_slice_in_instructions" in line and "cannot" in line and "KVM" in line


def test_host_without_vms_is_refused(vmstate):
    assert one_line_error(vmstate("host")).startswith("vmstate: host needs at least one VM")


@pytest.mark.parametrize("args, message", [
    (["--slice-ms", "0", "-v", "x"], "vmstate: --slice-ms: 0 ms is not between 1 and 60000"),
    (["--memory", "1K", "-v", "x"], "vmstate: --memory: memory 1K is not between 8 MiB"),
    (["-v", "'unclosed"], "vmstate: -v: \"'unclosed\": No closing quotation")])
def test_bad_host_options_refused_in_one_line(vmstate, args, message):
    result = vmstate("host", *args)
    assert result.returncode == 2
    assert one_line_error(result).startswith(message)


@pytest.mark.kvm
def test_a_vm_that_cannot_start_is_named(vmstate, guest):
    result = vmstate("host", "-v", f"{guest('ticker')} 1 1 0", "-v", "no/such/program")
    assert result.returncode == 127
    assert one_line_error(result).startswith("vmstate: VM program (-v): ")


@pytest.mark.kvm
def test_a_vm_blocked_in_a_read_does_not_hold_up_the_others(vmstate_cmd, guest, tmp_path):
    os.mkfifo(tmp_path / "wait.fifo")
    host = subprocess.Popen([vmstate_cmd, "host", "-v", f"{guest('read_once')} wait.fifo",
                             "-v", f"{guest('ticker')} 5 20 0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(30, host.kill)          # a VMM held up fails, not hangs
    watchdog.start()
    try:
        first = host.stderr.readline().decode()     # the ticker ends while the reader waits
        assert first == "vmstate: [ticker] exit status 0\n", first
        with open(tmp_path / "wait.fifo", "wb") as fifo:
            fifo.write(b"news")
        out, err = host.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if host.poll() is None:
            host.kill()
            host.communicate()
    assert host.returncode == 0, err
    lines = tagged(out)
    assert [text for tag, text in lines if tag == "ticker"] == [f"tick {i}" for i in range(5)]
    assert ("read_once", "read 4: news") in lines
