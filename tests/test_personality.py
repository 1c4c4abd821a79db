"""The Linux personality in-process: a fake CPU (registers in a dict, memory in a bytearray)
and a scratch root, no KVM."""

from __future__ import annotations

import errno
import os

import pytest

from linux_personality import GuestExit, Personality
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
