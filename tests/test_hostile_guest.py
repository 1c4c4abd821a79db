"""A guest that attacks its VMM (tests/guests/hostile.c) reaches nothing outside its root and
cannot make the VMM use unbounded host memory or processes; each attack ends as Linux would
end it, never as an internal error of the VMM."""

import shutil
import subprocess
import time

import pytest

from linux_personality.processes import guest_process_count
from vmstate.state import DEFAULT_MAX_PROCESSES

pytestmark = pytest.mark.kvm


@pytest.fixture
def root(tmp_path, guest):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(guest("hostile"), root / "hostile")
    return root


def run(vmstate, root, *args, options=()):
    return vmstate("run", *options, "--root", root, root / "hostile", *args, cwd=root)


def lines(result) -> list[str]:
    return result.stdout.decode().splitlines()


@pytest.mark.both_cpus
def test_a_symlink_out_of_the_root_leads_nowhere(vmstate, root, tmp_path, cpu):
    outside = tmp_path / "outside"
    outside.write_text("host secret\n")
    outside.chmod(0o600)
    before = outside.stat()
    result = run(vmstate, root, "escape", outside, options=("--cpu", cpu))
    assert result.returncode == 0, result.stderr
    assert lines(result) == [
        "symlink 0 ok",                                   # stored as given ...
        "chown -1 No such file or directory",             # ... and followed inside the root
        "utimensat -1 No such file or directory",
        "linkat -1 No such file or directory",
        "open exe for writing -1 Text file busy"]         # a running program is not written
    after = outside.stat()
    assert (after.st_uid, after.st_mtime_ns, after.st_nlink) == \
        (before.st_uid, before.st_mtime_ns, before.st_nlink)
    assert not (root / "hard").exists()
    assert outside.read_text() == "host secret\n"


@pytest.mark.both_cpus
def test_execve_with_too_many_argument_bytes_is_e2big(vmstate, root, cpu):
    result = run(vmstate, root, "argv", options=("--cpu", cpu))
    assert result.returncode == 0, result.stderr
    assert lines(result) == ["execve -1 Argument list too long"]


def test_a_fork_tree_is_capped_for_the_whole_vm(vmstate_cmd, root):
    """8 + 64 + 512 + 4096 processes asked for, each living 2 s: forks fail with EAGAIN once
    the VM's tree holds DEFAULT_MAX_PROCESSES. The check and the fork are not one atomic step,
    so processes forking at the same moment can pass it together: the peak stays below
    twice the cap (it was 2641 processes before the cap)."""
    vm = subprocess.Popen([vmstate_cmd, "run", "--root", root, root / "hostile", "forktree"],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while vm.poll() is None:
        peak = max(peak, guest_process_count(vm.pid))
        time.sleep(0.05)
    out, err = vm.communicate()
    assert vm.returncode == 0, err
    counts = [tuple(int(word) for word in line.split()[1::2]) for line in out.decode().split("\n")
              if line]
    assert sum(failed for _, failed in counts) > 0
    assert DEFAULT_MAX_PROCESSES // 2 < peak < 2 * DEFAULT_MAX_PROCESSES, peak


@pytest.mark.both_cpus
def test_writev_under_a_file_size_limit_copies_nothing(vmstate, root, cpu):
    """1024 iovecs over one 64 MiB buffer: the VMM writes the first MiB without joining
    64 GiB of views into one buffer (that was a MemoryError)."""
    result = run(vmstate, root, "writev", options=("--cpu", cpu, "--memory", "256M",
                                                   "--max-file-size", "1M"))
    assert result.returncode == 0, result.stderr
    assert lines(result) == ["writev 1048576 ok"]
    assert (root / "written").stat().st_size == 1 << 20


@pytest.mark.both_cpus
def test_a_signal_frame_that_does_not_fit_kills_the_guest_by_sigsegv(vmstate, root, cpu):
    result = run(vmstate, root, "sigstack", options=("--cpu", cpu))
    assert result.returncode == 128 + 11
    assert lines(result) == ["sigaltstack 0 ok"]
    assert result.stderr.decode() == "vmstate: guest killed by SIGSEGV\n"



@pytest.mark.both_cpus
def test_proc_self_exe_never_shows_a_host_path(vmstate, tmp_path, cpu):
    """readlink /proc/self/exe: the path inside the root, or for a program outside the root
    only its name under /; busybox re-executes itself through /proc/self/exe (the root has
    no `sleep`) wherever it lies."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    script = "readlink /proc/self/exe; sleep 0.1 && echo slept"
    outside = vmstate("run", "--root", root, "/bin/busybox", "sh", "-c", script)
    assert outside.returncode == 0, outside.stderr
    assert outside.stdout.decode().splitlines() == ["/busybox", "slept"]
    inside = vmstate("run", "--root", root, root / "bin" / "busybox", "sh", "-c", script)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.decode().splitlines() == ["/bin/busybox", "slept"]
