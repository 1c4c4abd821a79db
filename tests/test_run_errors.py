"""Bad programs, hostile guests and missing KVM: one-line errors, documented exit codes."""

import os
import shutil
import struct
import subprocess

import pytest

from helpers import one_line_error
from vmstate.errors import EXIT_CANNOT_RUN, EXIT_NO_KVM, EXIT_NOT_FOUND, EXIT_USAGE

pytestmark = pytest.mark.kvm


def _patched_copy(src, dst, offset, data):
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


@pytest.mark.parametrize("case, expected", [
    ("text", "not an ELF executable"),
    ("dynamic", "dynamically linked"),
    ("pie", "position-independent executable (PIE)"),
    ("elf32", "32-bit ELF"),
    ("arm64", "ELF for EM_AARCH64, not x86-64"),
    ("truncated", "corrupt ELF file"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),          # refused at once, not a wait for a writer
])
def test_unrunnable_programs(vmstate, guest, example, tmp_path, case, expected):
    program = {
        "text": lambda: _write(tmp_path / "notes.txt", b"just text\n"),
        "dynamic": lambda: guest("dynamic"),
        "pie": lambda: guest("pie"),
        "elf32": lambda: _patched_copy(example("hello"), tmp_path / "elf32", 4, b"\x01"),
        "arm64": lambda: _patched_copy(example("hello"), tmp_path / "arm64", 18,
                                       struct.pack("<H", 183)),
        "truncated": lambda: _write(tmp_path / "trunc", open(example("hello"), "rb").read(100)),
        "directory": lambda: tmp_path,
        "fifo": lambda: os.mkfifo(tmp_path / "pipe") or tmp_path / "pipe",
    }[case]()
    result = vmstate("run", program)
    assert result.returncode == EXIT_CANNOT_RUN
    assert expected in one_line_error(result)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_missing_program(vmstate, tmp_path):
    result = vmstate("run", tmp_path / "nothing")
    assert result.returncode == EXIT_NOT_FOUND
    assert "no such file" in one_line_error(result)


@pytest.mark.both_cpus
def test_program_larger_than_memory(vmstate, guest):
    result = vmstate("run", "--memory", "16M", guest("big_bss"))
    assert result.returncode == EXIT_CANNOT_RUN
    assert "does not fit in guest memory" in one_line_error(result)


def test_bad_memory_size(vmstate, example):
    result = vmstate("run", "--memory", "lots", example("hello"))
    assert result.returncode == EXIT_USAGE
    assert "bad size 'lots'" in one_line_error(result)


@pytest.mark.parametrize("args, message", [
    (("run", "--memory", "abc", "PROGRAM"), "--memory: bad size 'abc'"),
    (("run", "--memory", "100G", "PROGRAM"), "--memory must be between 8 MiB and 64 GiB"),
    (("run", "--memory", "9" * 5000, "PROGRAM"), "--memory: bad size '99999"),
    (("run", "--migrate-to", "4040", "PROGRAM"), "--migrate-to: bad address '4040'"),
    (("run", "--connect-timeout", "-1", "PROGRAM"), "--connect-timeout -1.0: must be from 0"),
    (("send", "vm_image.sav", "nohostport"), "bad address 'nohostport' (expected HOST:PORT)"),
    (("send", "vm_image.sav", ":99999"), "bad port 99999 in ':99999' (1 to 65535)"),
    (("receive", "-o", "x.sav", "--max-size", "zz"), "--max-size: bad size 'zz'"),
    (("receive", "-o", "x.sav", "--min-rate", "0"), "--min-rate: bad size '0': must be positive"),
    (("receive", "-o", "x.sav", "--port", "99999"), "--port 99999: must be from 0 to 65535"),
    (("receive", "-o", "x.sav", "--max-senders", "0"), "--max-senders 0: must be from 1 to 64"),
    (("info", "--instructions", "-5", "vm_image.sav"), "--instructions -5: must be from 0"),
    (("receive", "-o", "x.sav", "--max-senders", "abc"),     # click's own checks, one line too
     "Invalid value for '--max-senders': 'abc' is not a valid int. (see vmstate receive --help)"),
    (("run", "--max-instructions", "1.5", "PROGRAM"), "'--max-instructions': '1.5' is not a valid"),
    (("run", "--no-such-option", "PROGRAM"), "No such option: --no-such-option"),
    (("split",), "Missing argument 'IMAGE'. (see vmstate split --help)"),
    (("frobnicate",), "No such command 'frobnicate'."),
])
def test_bad_option_values_are_a_bad_command_line(vmstate, example, args, message):
    """Exit status 2 and one line, before anything runs; a huge value is quoted in part."""
    result = vmstate(*(example("hello") if a == "PROGRAM" else a for a in args))
    assert result.returncode == EXIT_USAGE
    line = one_line_error(result)
    assert message in line and len(line) < 200, line


def test_a_huge_path_is_quoted_in_part_and_the_reason_kept(vmstate):
    result = vmstate("info", "x" * 5000)
    line = one_line_error(result)
    assert len(line) < 500 and line.endswith(": cannot open: File name too long"), line


def test_a_device_that_is_not_kvm(vmstate, example):
    result = vmstate("run", "--cpu", "kvm", example("hello"),
                     env={"VMSTATE_KVM_DEVICE": "/dev/null"})
    assert result.returncode == EXIT_NO_KVM
    assert one_line_error(result) == ("vmstate: KVM is not available: /dev/null is not a KVM "
                                      "device (KVM_GET_API_VERSION: Inappropriate ioctl for "
                                      "device)")


@pytest.mark.both_cpus
def test_guest_cannot_escape_root(vmstate, guest, tmp_path):
    """The root is the guest's /: `..` at the top stays there and an absolute symlink
    resolves inside it, so none of these reaches the host's /etc/passwd (which exists)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.txt").write_text("ok")
    os.symlink("/etc/passwd", root / "escape_link")
    assert os.path.exists("/etc/passwd")
    result = vmstate("run", "--root", root, guest("escape"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "../../etc/passwd: No such file or directory", "/etc/passwd: No such file or directory",
        "escape_link: No such file or directory", "inside.txt: OPENED"]


@pytest.mark.both_cpus
def test_wild_pointers_get_efault_and_the_guest_goes_on(vmstate, guest):
    result = vmstate("run", guest("wild_pointer"), input=b"")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "write(wild) = -14", "read(kernel area) = -14", "open(wild path) = -14",
        "writev(wild iovec) = -14", "still alive"]


@pytest.mark.both_cpus
def test_null_dereference_is_reported_not_hung(vmstate, guest):
    result = vmstate("run", guest("null_deref"), timeout=30)
    assert result.returncode == 128 + 11
    assert result.stdout == b"about to fault\n"
    message = one_line_error(result)
    assert "#PF page fault (vector 14)" in message
    assert "write of address 0x0" in message
    assert "at rip 0x" in message


def test_missing_kvm_device(vmstate, example, tmp_path):
    result = vmstate("run", "--cpu", "kvm", example("hello"),
                     env={"VMSTATE_KVM_DEVICE": str(tmp_path / "kvm")})
    assert result.returncode == EXIT_NO_KVM
    assert "KVM is not available" in one_line_error(result)


def test_without_kvm_auto_runs_on_the_software_cpu_and_says_so_once(vmstate, example, tmp_path):
    result = vmstate("run", "--cpu", "auto", example("hello"), "one",
                     env={"VMSTATE_KVM_DEVICE": str(tmp_path / "kvm")})
    assert result.returncode == 0, result.stderr
    assert b"arg 1: one" in result.stdout
    assert result.stderr.decode().splitlines() == [
        f"vmstate: KVM is not available: {tmp_path / 'kvm'} does not exist (is the kvm module "
        "loaded?); running the guest on the software CPU (unicorn)"]


def test_max_instructions_is_refused_on_kvm(vmstate, example):
    result = vmstate("run", "--cpu", "kvm", "--max-instructions", "100", example("hello"))
    assert result.returncode == 2
    assert "--max-instructions needs the software CPU" in one_line_error(result)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run as an unprivileged user")
def test_kvm_without_permission(vmstate_cmd, example, tmp_path):
    os.chmod(tmp_path, 0o777)
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", vmstate_cmd, "run",
         "--cpu", "kvm", example("hello")], capture_output=True, cwd=tmp_path)
    assert result.returncode == EXIT_NO_KVM
    assert "no permission to open /dev/kvm" in one_line_error(result)


@pytest.mark.both_cpus
def test_unusual_calls_get_linux_answers_and_the_vm_survives(vmstate, guest, tmp_path):
    result = vmstate("run", guest("odd_calls"), input=b"")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "read 0 bytes = 0", "open with mode 06755 = ok", "pread at offset 2^63 = -22",
        "lseek whence 2^40 = -22", 'open "" = -2', "open . = ok"]
    mode = (tmp_path / "setuid_file").stat().st_mode
    assert mode & 0o7000 == 0                  # no set-uid/set-gid file from a guest
    restored = vmstate("restore", "vm_image.sav")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.decode().splitlines() == [
        "restored: fstat of the directory = 0, a directory",   # reopened by the restore
        "after close: fstat = -9"]                              # EBADF: the check can fail


@pytest.mark.both_cpus
def test_stack_overflow_faults_on_the_guard_page(vmstate, guest):
    result = vmstate("run", guest("recurse"), timeout=60)
    assert result.returncode == 128 + 11
    assert result.stdout == b"recursing\n"
    message = one_line_error(result)
    assert "#PF page fault (vector 14)" in message
    assert "the guard page below the stack: a stack overflow" in message


@pytest.mark.both_cpus
def test_a_sigsegv_handler_runs_on_a_guest_fault(vmstate, guest):
    """With a handler installed, a fault is delivered to it (with the faulting address in
    siginfo) and the guest goes on, as on Linux."""
    result = vmstate("run", guest("segv_handler"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"caught signal 11 at address 0x10\n"


@pytest.mark.both_cpus
def test_mprotect_is_enforced(vmstate, guest):
    """Read-only and PROT_NONE pages fault (the guest's SIGSEGV handler sees it), their
    neighbours do not, and read-write again works: the same lines as natively."""
    result = vmstate("run", guest("mprotect"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "rw write ok", "ro write fault, neighbour write ok, ro read ok x", "none read fault",
        "rw again write ok", "reservation read fault"]
