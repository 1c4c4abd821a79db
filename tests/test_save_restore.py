"""SAVE and RESTORE through the installed command, on real KVM: the lab flow, state that
must survive, saves requested by host signals, and the pending read of a blocked guest."""

import hashlib
import os
import signal
import subprocess
import time

import pytest

from helpers import wait_until_blocked, wait_until_computing
from vmstate.image.reader import Image

pytestmark = pytest.mark.kvm


@pytest.mark.both_cpus
def test_lab_flow(vmstate, example, tmp_path):
    saved = vmstate("run", example("lab_app"))
    assert saved.returncode == 0, saved.stderr
    assert "VM saved to vm_image.sav" in saved.stderr.decode()
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"
    restored = vmstate("restore", "vm_image.sav")
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


@pytest.mark.both_cpus
def test_restore_reopens_without_truncating_at_the_saved_offset(vmstate, example, tmp_path):
    assert vmstate("run", "--image", "lab.sav", example("lab_app")).returncode == 0
    (tmp_path / "ay_caramba.txt").write_bytes(b"Hello World !!!\nXXXXXXXXXXXXtail kept\n")
    assert vmstate("restore", "lab.sav").returncode == 0
    assert (tmp_path / "ay_caramba.txt").read_bytes() == \
        b"Hello World !!!\nBye Bye !!!\ntail kept\n"


def test_restore_resolves_files_in_another_root(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "ay_caramba.txt").write_bytes(b"0123456789abcdef")
    assert vmstate("restore", "--root", other, "vm_image.sav").returncode == 0
    assert (other / "ay_caramba.txt").read_bytes() == b"0123456789abcdefBye Bye !!!\n"
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"


def test_missing_file_at_restore_is_a_clear_error(vmstate, example, tmp_path):
    from helpers import one_line_error
    assert vmstate("run", example("lab_app")).returncode == 0
    (tmp_path / "ay_caramba.txt").unlink()
    result = vmstate("restore", "vm_image.sav")
    assert result.returncode == 125
    assert "guest fd 3 ('ay_caramba.txt'): cannot be reopened" in one_line_error(result)


@pytest.mark.both_cpus
def test_sse_register_counter_and_save_result_survive(vmstate, example):
    saved = vmstate("run", example("sse_keeper"))
    assert saved.stdout == b"before save: xmm7 = 3.141592653589793, counter = 1\n"
    restored = vmstate("restore", "vm_image.sav")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == (b'after restore: xmm7 = 3.141592653589793, counter = 2, '
                               b'save returned 0, message = "original message"\n')


@pytest.mark.both_cpus
def test_memory_survives_and_untouched_pages_are_holes(vmstate, example, tmp_path):
    assert vmstate("run", "--memory", "128M", example("fill_memory"), "32").returncode == 0
    image = tmp_path / "vm_image.sav"
    with Image(str(image)) as img:
        present = img.state.memory[0].present_pages * 4096
    assert 32 << 20 <= present < 40 << 20
    assert image.stat().st_size > 128 << 20                   # apparent size: all of memory
    assert image.stat().st_blocks * 512 < present + (1 << 20)  # on disk: only what is present
    restored = vmstate("restore", "vm_image.sav")
    assert restored.stdout == b"32 MiB intact after restore\n", restored.stderr


@pytest.mark.both_cpus
def test_restored_vm_saves_again_and_image_is_not_modified(vmstate, guest, tmp_path):
    first = vmstate("run", guest("save_twice"))
    assert first.stdout == b"step one\n"
    digest = hashlib.sha256((tmp_path / "vm_image.sav").read_bytes()).hexdigest()
    second = vmstate("restore", "--image", "second.sav", "vm_image.sav")
    assert second.stdout == b"step two\n", second.stderr
    assert hashlib.sha256((tmp_path / "vm_image.sav").read_bytes()).hexdigest() == digest
    again = vmstate("restore", "--image", "other.sav", "vm_image.sav")
    assert again.stdout == b"step two\n"                    # an image restores any number of times
    third = vmstate("restore", "second.sav")
    assert third.returncode == 0, third.stderr
    assert third.stdout == b"step three ba\n"


def test_second_save_may_replace_the_image_it_runs_from(vmstate, guest, tmp_path):
    assert vmstate("run", guest("save_twice")).stdout == b"step one\n"
    assert vmstate("restore", "vm_image.sav").stdout == b"step two\n"
    assert vmstate("restore", "vm_image.sav").stdout == b"step three ba\n"


def _start(vmstate_cmd, cwd, *args, stdin=subprocess.DEVNULL):
    """`vmstate ARGS` with SIGINT's default action, whatever the tests inherited: a shell
    runs a background job (`make test &`, without job control) with SIGINT ignored, and a
    VMM started so ignores Ctrl-C."""
    return subprocess.Popen([vmstate_cmd, *map(str, args)], cwd=cwd, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.both_cpus
def test_sigusr1_saves_a_computing_guest(vmstate_cmd, vmstate, guest, tmp_path, cpu):
    # About 2 s of computing on either CPU (the software one is ~150x slower here): the signal
    # comes 0.1 s into it by the VMM's own CPU time, so the guest cannot finish first, however
    # loaded the machine (it counted to 4000 million, done after 0.6 s: a fixed 0.3 s sleep
    # left too little on a busy one).
    millions = "60" if cpu == "soft" else "12000"
    process = _start(vmstate_cmd, tmp_path, "run", "--save-on-signal", guest("spin"), millions)
    assert process.stdout.readline() == b"spinning\n"
    wait_until_computing(process.pid)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert b"VM saved to vm_image.sav" in err
    with Image(str(tmp_path / "vm_image.sav")) as img:
        assert img.state.vmm.pending is None
        assert img.state.vcpus[0].sregs.cs.selector == 0x33     # stopped in the application
    restored = vmstate("restore", "vm_image.sav", timeout=120)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == f"counted to {millions}000000\n".encode()


def test_sigint_saves_only_when_asked(vmstate_cmd, guest, tmp_path):
    # About 3 s of counting, cut short by the signal: a guest that finished first (4000 million
    # took under a second) would exit 0 without a save. Not minutes: without
    # --save-on-interrupt nothing kicks the vCPU, so a SIGINT that lands between Python's
    # last signal check and KVM_RUN would only be seen at the guest's next exit (its last
    # write).
    plain = _start(vmstate_cmd, tmp_path, "run", guest("spin"), "12000")
    assert plain.stdout.readline() == b"spinning\n"
    plain.send_signal(signal.SIGINT)
    assert plain.wait(timeout=30) == 130
    assert not (tmp_path / "vm_image.sav").exists()
    asked = _start(vmstate_cmd, tmp_path, "run", "--save-on-interrupt", guest("spin"), "12000")
    assert asked.stdout.readline() == b"spinning\n"
    asked.send_signal(signal.SIGINT)
    assert asked.wait(timeout=30) == 0
    assert (tmp_path / "vm_image.sav").exists()


@pytest.mark.both_cpus
def test_reader_blocked_in_read_is_saved_with_its_pending_call(vmstate_cmd, vmstate, example,
                                                               tmp_path):
    read_end, write_end = os.pipe()       # the same pipe feeds the saved and the restored VM
    process = _start(vmstate_cmd, tmp_path, "run", "--save-on-signal", example("echo_lines"),
                     stdin=read_end)
    os.write(write_end, b"first\n")
    assert process.stdout.readline() == b"line 1: first (5 bytes)\n"
    wait_until_blocked(process.pid)                   # now blocked reading the next line
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    os.write(write_end, b"second\n")            # reaches the restored guest's re-issued read
    os.close(write_end)
    with Image(str(tmp_path / "vm_image.sav")) as img:
        pending = img.state.vmm.pending
        assert pending is not None and pending.nr == 0 and pending.args[0] == 0
        assert img.state.vcpus[0].regs.rip == pending.rip
    info = vmstate("info", "vm_image.sav")
    assert "Pending call   read(0x0, " in info.stdout.decode()
    restored = subprocess.run([vmstate_cmd, "restore", "vm_image.sav"], stdin=read_end,
                              capture_output=True, cwd=tmp_path, timeout=60)
    os.close(read_end)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == b"line 2: second (6 bytes)\n2 lines read\n"


ATTEMPTS = 5        # runs of the killed-save test, while the save ends before the kill


def test_killed_save_leaves_nothing_behind(vmstate_cmd, example, tmp_path):
    """SIGKILL while the image is being written: no file at all is left, not even a
    temporary one. The kill is sent once the VMM holds its unnamed output file; a run in
    which the save ended first (a test held up that long) is tried again."""
    for _ in range(ATTEMPTS):
        process = subprocess.Popen(
            [vmstate_cmd, "run", "--memory", "1G", "--image", "big.sav", example("fill_memory"),
             "768"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "VMSTATE_TIMING": "1"})
        for line in process.stderr:
            if line.startswith(b"vmstate-timing save-start"):
                break
        while process.poll() is None and not _writes_an_unnamed_file(process.pid, tmp_path):
            time.sleep(0.001)
        process.kill()
        process.wait()
        process.stderr.close()
        if process.returncode == 0:               # the save ended before the kill
            (tmp_path / "big.sav").unlink()
            continue
        assert process.returncode == -signal.SIGKILL
        assert sorted(p.name for p in tmp_path.iterdir()) == []
        return
    pytest.fail(f"the save ended before the kill in all {ATTEMPTS} runs")


def _writes_an_unnamed_file(pid: int, directory) -> bool:
    """The process has a file open in `directory` that has no name there (O_TMPFILE)."""
    fds = f"/proc/{pid}/fd"
    try:
        targets = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    except FileNotFoundError:                       # it has exited
        return False
    return any(t.startswith(f"{directory}/#") and t.endswith(" (deleted)") for t in targets)


def _stderr_through_a_terminal(command, cwd) -> tuple[int, bytes]:
    """Run `command` with stderr on a pseudo-terminal; returns its status and what it showed."""
    import pty
    import threading
    main_fd, terminal_fd = pty.openpty()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=terminal_fd)
    os.close(terminal_fd)
    shown = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:                      # EIO: the terminal's last user is gone
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    status = process.wait()
    reader.join(timeout=10)
    os.close(main_fd)
    return status, bytes(shown)


def test_long_save_shows_progress_on_a_terminal_only(vmstate, vmstate_cmd, example, tmp_path):
    command = [vmstate_cmd, "run", "--memory", "512M", "--image", "big.sav",
               example("fill_memory"), "300"]
    status, shown = _stderr_through_a_terminal(command, tmp_path)
    assert status == 0, shown
    assert b"writing big.sav" in shown and b"VM saved to big.sav" in shown
    piped = vmstate("run", "--memory", "512M", "--image", "big.sav", example("fill_memory"), "300")
    assert piped.returncode == 0
    assert b"writing" not in piped.stderr                   # a log file gets no bar
