"""The guest's OS state is VM state: a save in the middle of each kind of it (a pipe holding
bytes, a directory fd mid-listing, the cwd, the umask, a shared description, close-on-exec, a
signal handler and mask) restores exactly, through an image and through split -> join, and
blocking calls interrupted by a save are re-issued, not failed with EINTR."""

import signal
import subprocess
import time

import pytest

from helpers import wait_until_blocked

pytestmark = pytest.mark.kvm

AFTER = [b"save 0 pipe buffered", b"cwd /sub umask 027", b"shared defg offset 7 cloexec 0 1",
         b"listing went on 1", b"handler 12 hup blocked 1"]


@pytest.fixture
def root(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.txt").write_bytes(b"abcdefghij")
    for i in range(6):
        (tmp_path / "sub" / f"f{i}").write_bytes(b"")
    return tmp_path


def test_every_kind_of_os_state_survives_save_and_restore(vmstate, guest, root):
    saved = vmstate("run", "--root", root, guest("os_state"))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout == b"saving\n"
    info = vmstate("info", "vm_image.sav").stdout.decode()
    assert "cwd /sub  umask 0027" in info
    assert "pipe 0 (fd 3, fd 4): 8 bytes buffered" in info
    assert "fd 6 shares the open-file description of fd 5" in info
    restored = vmstate("restore", "--root", root, "vm_image.sav")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.splitlines() == AFTER


def test_os_state_survives_split_edit_and_join(vmstate, guest, root):
    assert vmstate("run", "--root", root, guest("os_state")).returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    xml = (root / "hw.xml").read_text()
    assert 'umask="027"' in xml and "YnVmZmVyZWQ=" in xml        # base64 of "buffered"
    (root / "hw.xml").write_text(xml.replace('umask="027"', 'umask="077"')
                                 .replace("YnVmZmVyZWQ=", "ZWRpdGVkIQ=="))   # "edited!"
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "new.sav")
    assert joined.returncode == 0, joined.stderr
    assert "guest os umask: 0x17 -> 0x3f" in joined.stdout.decode()
    assert "guest os pipes: 1 entries -> 1 entries, edited" in joined.stdout.decode()
    restored = vmstate("restore", "--root", root, "new.sav")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.splitlines() == [b"save 0 pipe edited!", b"cwd /sub umask 077",
                                            *AFTER[2:]]


def test_unedited_split_join_restores_the_same(vmstate, guest, root):
    assert vmstate("run", "--root", root, guest("os_state")).returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    assert vmstate("join", "vm.core", "hw.xml", "-o", "new.sav").returncode == 0
    assert (root / "new.sav").read_bytes() == (root / "vm_image.sav").read_bytes()
    assert vmstate("restore", "--root", root, "new.sav").stdout.splitlines() == AFTER


@pytest.mark.parametrize("script", [
    "read -t 5 line; echo status $?",          # a read with a timeout, on an empty stdin pipe
    "read line < /fifo; echo got $line",       # open of a FIFO with no writer yet
])
def test_sigusr1_during_a_blocking_call_saves_it_pending(vmstate_cmd, root, script):
    """The call is re-issued after the restore; the guest sees no EINTR."""
    import os
    import shutil
    shutil.copy("/bin/busybox", root / "busybox")
    os.mkfifo(root / "fifo")
    run = subprocess.Popen([vmstate_cmd, "run", "--save-on-signal", "--root", root,
                            root / "busybox", "sh", "-c", script], cwd=root,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until_blocked(run.pid)
    run.send_signal(signal.SIGUSR1)
    run.wait(timeout=30)                # stdin stays open: no end of file races the save
    out, err = run.stdout.read(), run.stderr.read()
    run.stdin.close()
    assert run.returncode == 0, err
    assert b"VM saved to vm_image.sav" in err, (out, err)
    info = subprocess.run([vmstate_cmd, "info", root / "vm_image.sav"], capture_output=True)
    pending = "poll(" if "-t" in script else "openat("
    assert pending in info.stdout.decode() and "re-issued on resume" in info.stdout.decode()
    restore = subprocess.Popen([vmstate_cmd, "restore", "--root", root, "vm_image.sav"],
                               cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    if "fifo" in script:
        time.sleep(0.3)
        (root / "fifo").write_bytes(b"hello\n")
    out, err = restore.communicate(timeout=30)
    assert restore.returncode == 0, err
    assert out == (b"status 1\n" if "-t" in script else b"got hello\n")
