"""The caps a user sets (`vmstate run --max-file-size --max-fds --max-processes`) are VM state:
saved in the image (section vmm-limits), shown by info, carried through split/join and
migration, and honoured after a restore."""

import json
import shutil
import signal
import subprocess

import pytest

from helpers import one_line_error
from test_os_state import _wait_until_blocked

# ulimit -n: the fd cap; a write past the file-size cap fails; six background sleeps: under a
# cap of 3 processes the shell and two children fit, and the third fork fails (busybox's sh
# says "can't fork" and exits 2).
SCRIPT = ("read line; ulimit -n; echo 12345678 > /big 2>/dev/null; echo write $?; "
          "for i in 1 2 3 4 5 6; do /busybox sleep 1 & echo started $i; done; wait; echo done")
CAPPED = ["20", "write 1", "started 1", "started 2"]
LIMITS = ("--max-fds", "20", "--max-processes", "3", "--max-file-size", "4")


@pytest.fixture
def root(tmp_path):
    shutil.copy("/bin/busybox", tmp_path / "busybox")
    return tmp_path


def _saved_while_reading(vmstate_cmd, root, *options):
    """Run SCRIPT with `options`; SIGUSR1 while it waits on stdin saves it there."""
    run = subprocess.Popen([vmstate_cmd, "run", "--save-on-signal", *options, "--root", root,
                            root / "busybox", "sh", "-c", SCRIPT], cwd=root,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_until_blocked(run.pid)    # the guest is blocked in read by then
    run.send_signal(signal.SIGUSR1)
    run.wait(timeout=30)
    err = run.stderr.read()
    run.stdin.close()
    run.stdout.close()
    run.stderr.close()
    assert run.returncode == 0, err
    assert (root / "vm_image.sav").exists()


def _restore(vmstate, root, image="vm_image.sav"):
    """(stdout lines, exit status, forks refused) of the restored guest."""
    restored = vmstate("restore", "--root", root, image, input=b"go\n", cwd=root)
    assert "Traceback" not in restored.stderr.decode()
    return (restored.stdout.decode().splitlines(), restored.returncode,
            restored.stderr.decode().count("can't fork"))


@pytest.mark.kvm
@pytest.mark.both_cpus
def test_limits_are_saved_shown_and_honoured_after_restore(vmstate_cmd, vmstate, root):
    _saved_while_reading(vmstate_cmd, root, *LIMITS)
    info = vmstate("info", "vm_image.sav", cwd=root).stdout.decode()
    assert "Limits         files up to 4 bytes  20 fds  3 processes" in info
    assert _restore(vmstate, root) == (CAPPED, 2, 1)
    assert (root / "big").read_bytes() == b"1234"          # EFBIG past the 4-byte cap


@pytest.mark.kvm
def test_without_options_the_defaults_are_saved(vmstate_cmd, vmstate, root):
    _saved_while_reading(vmstate_cmd, root)
    info = vmstate("info", "vm_image.sav", cwd=root).stdout.decode()
    assert "Limits         files up to any size  1024 fds  256 processes" in info
    started = [f"started {i}" for i in range(1, 7)]
    assert _restore(vmstate, root) == (["1024", "write 0", *started, "done"], 0, 0)


@pytest.mark.kvm
def test_limits_survive_split_edit_and_join(vmstate_cmd, vmstate, root):
    _saved_while_reading(vmstate_cmd, root, *LIMITS)
    assert vmstate("split", "vm_image.sav", cwd=root).returncode == 0
    xml = (root / "hw.xml").read_text()
    limits = '<limits max-file-size="4" max-fds="20" max-processes="3"/>'
    assert limits in xml
    (root / "hw.xml").write_text(xml.replace(limits, '<limits max-fds="30" max-processes="4"/>'))
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "new.sav", cwd=root)
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.decode().splitlines()[1:] == [
        "  limits max_file_size: 4 -> None", "  limits max_fds: 20 -> 30",
        "  limits max_processes: 3 -> 4"]
    assert _restore(vmstate, root, "new.sav") == (
        ["30", "write 0", "started 1", "started 2", "started 3"], 2, 1)


@pytest.mark.kvm
def test_limits_travel_with_a_migration(vmstate_cmd, vmstate, root, receivers, tmp_path):
    _saved_while_reading(vmstate_cmd, root, *LIMITS)
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    sent = vmstate("send", "vm_image.sav", f"127.0.0.1:{receiver.port}", cwd=root)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    info = vmstate("info", "--json", "got.sav", cwd=receiver_dir)
    assert json.loads(info.stdout)["limits"] == {"max_file_size": 4, "max_fds": 20,
                                                 "max_processes": 3}
    assert _restore(vmstate, root, receiver_dir / "got.sav") == (CAPPED, 2, 1)


@pytest.mark.parametrize("option, value, message", [
    ("--max-processes", "0", "--max-processes 0: must be from 1 to 32768"),
    ("--max-processes", "32769", "--max-processes 32769: must be from 1 to 32768"),
    ("--max-processes", "many", "--max-processes many: not a whole number"),
    ("--max-fds", "2", "--max-fds 2: must be from 3 to 1048576"),
    ("--max-fds", "1e3", "--max-fds 1e3: not a whole number"),
])
def test_a_bad_limit_exits_2_with_one_line(vmstate, tmp_path, option, value, message):
    result = vmstate("run", option, value, "/bin/true")
    assert result.returncode == 2
    assert one_line_error(result) == f"vmstate: {message}"
    assert list(tmp_path.iterdir()) == []
