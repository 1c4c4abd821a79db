"""The Linux personality in-process: a fake CPU (registers in a dict, memory in a bytearray)
and a scratch root, no KVM."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from linux_personality import GuestExit, GuestKilled, Personality
from linux_personality.address_space import UserAddressSpace
from linux_personality.fdtable import FileTable
from tests.fake_cpu import USER_START, FakeCpu, FakeMemory

BUF = USER_START + 0x1000
PATH = USER_START + 0x100
AT_FDCWD = -100 & 0xFFFFFFFF


class Guest:
    def __init__(self, root: str):
        self.memory = FakeMemory()
        self.cpu = FakeCpu(self.memory)
        self.files = FileTable.with_stdio(root)
        space = UserAddressSpace.fresh(self.memory, USER_START, USER_START + 0x10000,
                                       self.memory.user_end)
        self.k = Personality(self.cpu, self.files, space)

    def call(self, nr: int, *args: int) -> int:
        self.cpu.registers.update(rax=nr, **dict(zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"),
                                                       args)))
        self.k.serve()
        return self.cpu.returns[-1]

    def path(self, text: str, addr: int = PATH) -> int:
        return self.memory.put(addr, os.fsencode(text) + b"\0")


@pytest.fixture
def guest(tmp_path):
    g = Guest(str(tmp_path))
    yield g
    g.k.close()
    g.files.close_all()


def test_open_write_read_back_through_guest_memory(guest, tmp_path):
    fd = guest.call(257, AT_FDCWD, guest.path("out.txt"), os.O_CREAT | os.O_RDWR, 0o644)
    assert fd == 3
    guest.memory.put(BUF, b"hello personality")
    assert guest.call(1, fd, BUF, 17) == 17
    assert guest.call(8, fd, 0, os.SEEK_SET) == 0
    assert guest.call(0, fd, BUF + 100, 5) == 5
    assert guest.memory.read(BUF + 100, 5) == b"hello"
    assert guest.call(3, fd) == 0
    assert (tmp_path / "out.txt").read_bytes() == b"hello personality"
    assert guest.cpu.registers["rip"] == guest.cpu.registers["rcx"]   # returned to the guest


def test_errors_are_negative_errno_values(guest):
    assert guest.call(0, 77, BUF, 1) == -errno.EBADF
    assert guest.call(257, AT_FDCWD, guest.path("missing"), os.O_RDONLY, 0) == -errno.ENOENT
    assert guest.call(257, AT_FDCWD, 0x10, os.O_RDONLY, 0) == -errno.EFAULT
    assert guest.call(9999) == -errno.ENOSYS


def test_arch_prctl_sets_the_fs_base_register(guest):
    assert guest.call(158, 0x1002, 0x7000_1234) == 0
    assert guest.cpu.registers["fs_base"] == 0x7000_1234
    assert guest.call(158, 0x1003, BUF) == 0
    assert guest.memory.u64(BUF) == 0x7000_1234


def test_exit_group_ends_the_run_with_its_status(guest):
    with pytest.raises(GuestExit) as exit:
        guest.call(231, 7)
    assert exit.value.status == 7


def _open(guest, path, flags=os.O_RDONLY, mode=0o644):
    return guest.call(257, AT_FDCWD, guest.path(path), flags, mode)


def test_the_root_is_the_guests_slash(guest, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("guest's own\n")
    os.symlink("/etc/passwd", tmp_path / "link")
    for path in ("/etc/passwd", "../../../etc/passwd", "link", "/../link"):
        fd = _open(guest, path)
        assert fd >= 0, path
        n = guest.call(0, fd, BUF, 100)
        assert guest.memory.read(BUF, n) == b"guest's own\n", path
        guest.call(3, fd)


def test_directories_cwd_and_names(guest, tmp_path):
    assert guest.call(83, guest.path("/d"), 0o755) == 0
    assert guest.call(83, guest.path("/d"), 0o755) == -errno.EEXIST
    assert guest.call(80, guest.path("d")) == 0
    assert guest.call(79, BUF, 100) == 3
    assert guest.memory.read(BUF, 3) == b"/d\0"
    assert guest.call(3, _open(guest, "f", os.O_CREAT | os.O_WRONLY)) == 0
    assert guest.call(82, guest.path("f"), guest.path("g", PATH + 64)) == 0
    assert guest.call(88, guest.path("/d/g"), guest.path("s", PATH + 64)) == 0
    assert guest.call(89, guest.path("s"), BUF, 100) == 4
    assert guest.memory.read(BUF, 4) == b"/d/g"
    assert sorted(os.listdir(tmp_path / "d")) == ["g", "s"]
    assert guest.call(80, guest.path("../..")) == 0          # stays at the top
    assert guest.call(79, BUF, 100) == 2
    assert guest.call(84, guest.path("d")) == -errno.ENOTEMPTY
    assert guest.call(87, guest.path("d/s")) == 0
    assert guest.call(263, AT_FDCWD, guest.path("d/g"), 0) == 0
    assert guest.call(263, AT_FDCWD, guest.path("d"), 0x200) == 0
    assert os.listdir(tmp_path) == []


def test_getdents64_lists_a_directory(guest, tmp_path):
    for name in ("a", "bb", "ccc"):
        (tmp_path / name).write_text(name)
    fd = _open(guest, "/", os.O_RDONLY | os.O_DIRECTORY)
    n = guest.call(217, fd, BUF, 4096)
    assert n > 0
    data, names, pos = guest.memory.read(BUF, n), set(), 0
    while pos < n:
        reclen = int.from_bytes(data[pos + 16:pos + 18], "little")
        names.add(data[pos + 19:pos + reclen].split(b"\0")[0].decode())
        pos += reclen
    assert names == {".", "..", "a", "bb", "ccc"}
    assert guest.call(217, fd, BUF, 4096) == 0


def test_dup_shares_the_offset_and_cloexec_is_per_fd(guest, tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    fd = _open(guest, "f", os.O_RDONLY | os.O_CLOEXEC)
    copy = guest.call(72, fd, 0, 10)              # F_DUPFD from 10
    assert copy == 10
    assert guest.call(72, fd, 1) == 1             # F_GETFD: FD_CLOEXEC
    assert guest.call(72, copy, 1) == 0
    assert guest.call(0, fd, BUF, 4) == 4
    assert guest.call(0, copy, BUF, 4) == 4
    assert guest.memory.read(BUF, 4) == b"4567"
    assert guest.call(33, copy, 1) == 1           # dup2 over stdout
    guest.call(3, fd)
    guest.call(3, copy)
    assert guest.call(0, 1, BUF, 10) == 2         # the description lives on in fd 1
    assert guest.memory.read(BUF, 2) == b"89"


def test_pipe_carries_bytes(guest):
    assert guest.call(293, BUF, 0) == 0
    read_fd, write_fd = (int.from_bytes(guest.memory.read(BUF + i, 4), "little") for i in (0, 4))
    guest.memory.put(BUF + 64, b"through")
    assert guest.call(1, write_fd, BUF + 64, 7) == 7
    assert guest.call(0, read_fd, BUF + 128, 100) == 7
    assert guest.memory.read(BUF + 128, 7) == b"through"


def test_linux_edge_cases(guest, tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    fd = _open(guest, "f")
    assert guest.call(0, fd, BUF, 1 << 40) == 3                    # clipped, not EFAULT
    long_path = guest.memory.put(BUF, b"a" * 5000 + b"\0")
    assert guest.call(257, AT_FDCWD, long_path, 0, 0) == -errno.ENAMETOOLONG
    assert guest.call(11, 0xFFFFFFFFFFFFF000, 0x2000) == -errno.EINVAL   # wraps
    assert guest.call(9999) == -errno.ENOSYS


def test_max_file_size_gives_efbig(tmp_path):
    g = Guest(str(tmp_path))
    g.k.max_file_size = 5
    fd = _open(g, "f", os.O_CREAT | os.O_WRONLY)
    g.memory.put(BUF, b"0123456789")
    assert g.call(1, fd, BUF, 10) == 5
    assert g.call(1, fd, BUF, 10) == -errno.EFBIG
    assert (tmp_path / "f").read_bytes() == b"01234"
    g.files.close_all()


def test_descriptor_cap_gives_emfile(tmp_path):
    g = Guest(str(tmp_path))
    g.files.max_fds = 5
    (tmp_path / "f").write_text("")
    assert [_open(g, "f") for _ in range(3)] == [3, 4, -errno.EMFILE]
    g.files.close_all()


def test_a_signal_handler_runs_and_sigreturn_restores_the_context(guest):
    """kill to itself with a handler installed: the call returns into the handler on an
    rt_sigframe; rt_sigreturn puts back every register, the mask and the FPU state."""
    sigaction = USER_START + 0x2000
    guest.memory.put(sigaction, struct.pack("<QQQQ", 0x401234, 0x04000000, 0x405678, 0))
    assert guest.call(13, 10, sigaction, 0, 8) == 0            # rt_sigaction(SIGUSR1)
    stack = USER_START + 0xF0000
    guest.cpu.registers.update(rsp=stack, rbx=0x1111, r12=0x2222, rflags=0x246)
    before = dict(guest.cpu.registers)
    guest.cpu.fpu = bytes(512)
    guest.call(62, 1, 10)                                      # kill(getpid(), SIGUSR1)
    regs = guest.cpu.registers
    assert (regs["rip"], regs["rdi"]) == (0x401234, 10)
    frame = regs["rsp"]
    assert frame < stack - 128 and (frame + 8) % 16 == 0
    assert guest.memory.u64(frame) == 0x405678                 # returns to the restorer
    assert guest.k.signals.blocked == 1 << 9                   # SIGUSR1 blocked meanwhile
    guest.cpu.fpu = b"\xff" * 512                              # the handler clobbers the FPU
    guest.cpu.registers.update(rsp=frame + 8, rbx=0, r12=0)    # `ret` popped the pretcode
    guest.call(15)                                             # rt_sigreturn
    for name in ("rbx", "r12", "rsp", "rcx"):
        assert regs[name] == before[name], name
    assert regs["rip"] == before["rcx"]       # where the interrupted call returns to
    assert guest.cpu.fpu == bytes(512)
    assert guest.k.signals.blocked == 0


def test_fatal_and_ignored_signals(guest):
    assert guest.call(62, 1, 17) == 0                          # SIGCHLD: ignored by default
    with pytest.raises(GuestKilled) as killed:
        guest.call(62, 1, 15)                                  # SIGTERM: fatal by default
    assert killed.value.signal == 15
