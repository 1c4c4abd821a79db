"""Process system calls: identity of the one guest process, its exit, its CPU registers
(arch_prctl) and the lab's SAVE call."""

from __future__ import annotations

import errno
import os
import struct

from vmstate import x86

from .stops import GuestExit, SaveRequested
from .table import syscall

ROBUST_LIST_HEAD_SIZE = 24
PR_SET_NAME, PR_GET_NAME = 15, 16
GETRANDOM_MAX = 1 << 25
ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
ARCH_REGISTERS = {ARCH_SET_FS: "fs_base", ARCH_GET_FS: "fs_base", ARCH_SET_GS: "gs_base",
                  ARCH_GET_GS: "gs_base"}
SYSCALL_SAVE = 400          # the ScratchVM lab's convention: the guest asks for a SAVE


@syscall(158, "arch_prctl", "arch ptr")
def sys_arch_prctl(k, code, addr):
    if code not in ARCH_REGISTERS:
        return -errno.EINVAL
    if code in (ARCH_SET_FS, ARCH_SET_GS):
        if not x86.is_canonical(addr):
            return -errno.EPERM
        k.cpu.write_register(ARCH_REGISTERS[code], addr)
    else:
        k.memory.write(addr, struct.pack("<Q", k.cpu.read_register(ARCH_REGISTERS[code])))
    return 0


@syscall(218, "set_tid_address", "ptr")
def sys_set_tid_address(k, addr):
    return k.pid


@syscall(39, "getpid")
def sys_getpid(k):
    return k.pid


@syscall(186, "gettid")
def sys_gettid(k):
    return k.pid


@syscall(110, "getppid")
def sys_getppid(k):
    return k.parent_pid


@syscall(111, "getpgrp")
def sys_getpgrp(k):
    return k.pid


@syscall(121, "getpgid", "int")
def sys_getpgid(k, pid):
    return k.pid


@syscall(124, "getsid", "int")
def sys_getsid(k, pid):
    return k.pid


@syscall(109, "setpgid", "int int")
def sys_setpgid(k, pid, pgid):
    return 0


@syscall(112, "setsid")
def sys_setsid(k):
    return -errno.EPERM


@syscall(273, "set_robust_list", "ptr size")
def sys_set_robust_list(k, head, length):
    return 0 if length == ROBUST_LIST_HEAD_SIZE else -errno.EINVAL


@syscall(157, "prctl", "int hex hex")
def sys_prctl(k, option, arg2, arg3):
    if option in (PR_SET_NAME, PR_GET_NAME):
        if option == PR_GET_NAME:
            k.memory.write(arg2, os.fsencode(os.path.basename(k.program))[:15].ljust(16, b"\0"))
        return 0
    return -errno.EINVAL


@syscall(61, "wait4", "int ptr hex ptr")
def sys_wait4(k, pid, status, options, rusage):
    return -errno.ECHILD


@syscall(318, "getrandom", "out size hex")
def sys_getrandom(k, buf, length, flags):
    data = os.urandom(min(length, GETRANDOM_MAX))
    k.memory.write(buf, data)
    return len(data)


@syscall(60, "exit", "int")
def sys_exit(k, status):
    raise GuestExit(status & 0xFF)


@syscall(231, "exit_group", "int")
def sys_exit_group(k, status):
    raise GuestExit(status & 0xFF)


@syscall(SYSCALL_SAVE, "vmstate_save")
def sys_save(k):
    if not k.save_enabled:
        return -errno.ENOSYS
    raise SaveRequested()
