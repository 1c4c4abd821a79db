"""`vmstate run`: the bundled examples through the installed command, on real KVM."""

import re

import pytest
from elftools.elf.elffile import ELFFile

pytestmark = [pytest.mark.kvm, pytest.mark.both_cpus]


def test_hello_prints_float_tls_malloc_and_args(vmstate, example):
    result = vmstate("run", example("hello"), "first", "--second")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == f"hello from {example('hello')}"
    assert lines[1:] == ["small block, large block ends with 'x'", "tls counter = 42",
                         "pi is about 3.141593", "arg 1: first", "arg 2: --second"]


def test_lab_app_writes_its_file_in_root(vmstate, example, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    result = vmstate("run", "--root", root, example("lab_app"))
    assert result.returncode == 0, result.stderr
    assert (root / "ay_caramba.txt").read_bytes().startswith(b"Hello World !!!\n")


def test_echo_lines_answers_stdin(vmstate, example):
    result = vmstate("run", example("echo_lines"), input=b"first\nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "line 1: first (5 bytes)", "line 2: second line (11 bytes)", "2 lines read"]


def test_guest_exit_status_is_the_command_status(vmstate, guest):
    result = vmstate("run", guest("nostdlib"))
    assert result.returncode == 3
    assert result.stdout == b"no libc here\n"


def _writable_segment(program: str) -> range:
    with open(program, "rb") as f:
        segment = next(s for s in ELFFile(f).iter_segments()
                       if s["p_type"] == "PT_LOAD" and s["p_flags"] & 2)
        return range(segment["p_vaddr"], segment["p_vaddr"] + segment["p_memsz"])


def test_trace_lines_are_strace_like(vmstate, example, tmp_path):
    result = vmstate("run", "--trace", example("lab_app"))
    trace = result.stderr.decode().splitlines()
    tls = re.fullmatch(r"arch_prctl\(ARCH_SET_FS, (0x[0-9a-f]+)\) = 0", trace[0])
    tid = re.fullmatch(r"set_tid_address\((0x[0-9a-f]+)\) = 1", trace[1])   # the guest's pid
    assert tls and tid, trace[:2]
    data = _writable_segment(example("lab_app"))      # musl's TLS and thread block live there
    assert int(tls[1], 16) in data and int(tid[1], 16) in data
    assert trace[2:5] == [
        'open("./ay_caramba.txt", O_RDWR|O_CREAT|O_LARGEFILE, 0777) = 3',
        'write(3, "Hello World !!!\\n", 16) = 16',
        "vmstate_save() = ?"]


def test_trace_of_a_whole_run_ends_with_exit(vmstate, example):
    result = vmstate("run", "--trace", example("hello"))
    assert result.stderr.decode().splitlines()[-1] == "exit_group(0) = ?"


def test_unserviced_call_gets_enosys_and_is_named_in_trace(vmstate, guest):
    result = vmstate("run", "--trace", guest("unknown_syscall"))
    assert result.returncode == 0
    assert result.stdout == b"acct: ENOSYS\n"
    assert "acct(0x0, " in result.stderr.decode()
    assert "= -1 ENOSYS (Function not implemented)" in result.stderr.decode()


def test_many_system_calls_run(vmstate, guest):
    result = vmstate("run", guest("syscall_loop"), "3000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"3000 getpid calls, 3000 answered pid 1\n"   # the VMM's pid, not ours


def test_a_second_child_ending_raises_sigchld_again(vmstate, guest):
    """The first child's SIGCHLD came and it is not reaped when the second child ends: the
    second end raises SIGCHLD too, as on Linux."""
    result = vmstate("run", guest("sigchld_twice"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["SIGCHLD 2 times", "reaped, statuses 3"]
