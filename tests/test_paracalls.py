"""Para-calls 401-403 from a real guest (tests/guests/paracalls.c): their output and return
values, the snapshot's copy seeing 1, migration's success and failure."""

from __future__ import annotations

import errno

import pytest

from test_migration import Receiver, free_port

pytestmark = pytest.mark.kvm


def test_dump_and_snapshot_then_restore_the_snapshot(vmstate, guest, tmp_path):
    ran = vmstate("run", guest("paracalls"))
    out, err = ran.stdout.decode(), ran.stderr.decode()
    assert ran.returncode == 3, err
    assert out.splitlines() == [
        "dump=0", f"bad-snapshot={-errno.ENOENT}", f"fault-snapshot={-errno.EFAULT}",
        "snapshot=0", "original goes on, marker Original"]
    dump = [line for line in err.splitlines() if line.startswith("[paracalls] ")]
    traced = vmstate("run", "--trace", guest("paracalls")).stderr.decode().splitlines()
    assert "vmstate_dump_processor_state() = 0" in traced
    assert f"vmstate_snapshot({0x10:#x}) = {-errno.EFAULT}" in traced
    assert "vmstate_snapshot(\"snap.sav\") = 0" in traced
    text = "\n".join(dump)
    for expected in ("processor state of VM paracalls", "rax 0x0000000000000000", "rip 0x",
                     "rflags 0x", "IF]", "cs  selector 0x33",
                     "fs  selector", "cr0 0x80010033 [PE MP ET NE WP PG]", "efer 0x",
                     "[SCE LME LMA]", "Next instructions at rip"):
        assert expected in text, text
    assert len([line for line in dump if line.startswith("[paracalls]     0x")]) >= 3  # disasm

    restored = vmstate("restore", "snap.sav")
    assert restored.returncode == 7, restored.stderr
    assert restored.stdout.decode().splitlines() == ["snapshot=1",
                                                      "restored copy, marker original"]

    split = vmstate("split", "snap.sav")
    assert split.returncode == 0, split.stderr
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "joined.sav")
    assert joined.returncode == 0, joined.stderr
    assert (tmp_path / "joined.sav").read_bytes() == (tmp_path / "snap.sav").read_bytes()
    assert vmstate("restore", "joined.sav").returncode == 7


def test_snapshot_lands_inside_the_guest_root(vmstate, guest, tmp_path):
    (tmp_path / "guestroot").mkdir()
    ran = vmstate("run", "--root", "guestroot", guest("paracalls"))
    assert ran.returncode == 3, ran.stderr
    assert (tmp_path / "guestroot" / "snap.sav").exists()
    assert not (tmp_path / "snap.sav").exists()
    restored = vmstate("restore", "--root", "guestroot", "guestroot/snap.sav")
    assert restored.returncode == 7, restored.stderr


def test_migrate_returns_1_on_the_destination(vmstate, vmstate_cmd, guest, tmp_path):
    receiver = Receiver(vmstate_cmd, tmp_path, "--run", "--once", "--root", tmp_path)
    try:
        sent = vmstate("run", guest("paracalls"), f"127.0.0.1:{receiver.port}")
        assert sent.returncode == 0, sent.stderr
        assert f"VM migrated to 127.0.0.1:{receiver.port}" in sent.stderr.decode()
        assert "migrate=" not in sent.stdout.decode()          # the source never returns
        assert receiver.process.wait(timeout=60) == 9
        assert receiver.process.stdout.read().decode().splitlines() == ["migrate=1"]
        receiver.read_log_until("ended: exit status 9")
    finally:
        receiver.stop()


@pytest.mark.parametrize("cpu", ["kvm", "soft"])
def test_migrate_under_live_returns_0_and_the_guest_goes_on_at_the_destination(
        vmstate, vmstate_cmd, guest, tmp_path, cpu):
    receiver = Receiver(vmstate_cmd, tmp_path, "--run", "--once", "--root", tmp_path)
    try:
        sent = vmstate("run", "--cpu", cpu, "--live", guest("paracalls"),
                       f"127.0.0.1:{receiver.port}")
        assert sent.returncode == 0, sent.stderr
        assert f"VM migrated live to 127.0.0.1:{receiver.port}" in sent.stderr.decode()
        assert receiver.process.wait(timeout=60) == 11
        here = sent.stdout.decode().splitlines()
        there = receiver.process.stdout.read().decode().splitlines()
    finally:
        receiver.stop()
    assert here[here.index("migrate=0") + 1:] + there == [f"live tick {i}" for i in range(60)]


@pytest.mark.parametrize("address, expected", [
    (lambda: f"127.0.0.1:{free_port()}", -errno.ECONNREFUSED),
    (lambda: "no port here", -errno.EINVAL)])
def test_failed_migration_returns_errno_and_the_vm_goes_on(vmstate, guest, address, expected):
    ran = vmstate("run", "--connect-timeout", "0", guest("paracalls"), address())
    assert ran.returncode == 3, ran.stderr
    lines = ran.stdout.decode().splitlines()
    assert lines[-2:] == [f"migrate={expected}", "original goes on, marker Original"]
