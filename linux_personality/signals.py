"""Signal system calls: dispositions, the blocked mask and the alternate stack are recorded;
a signal the guest sends itself takes its default action or is ignored. (Running guest
handlers is not served yet: a signal with a handler installed is left pending.)"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from .paths import error
from .stops import GuestKilled
from .table import signed32, syscall

NSIG = 64
SIGKILL, SIGSTOP, SIGCHLD, SIGCONT, SIGURG, SIGWINCH = 9, 19, 17, 18, 23, 28
SIG_DFL, SIG_IGN = 0, 1
SIGACTION = struct.Struct("<QQQQ")        # handler, flags, restorer, mask
SIGSET_SIZE = 8
STACK_T_SIZE = 24
IGNORED_BY_DEFAULT = {SIGCHLD, SIGCONT, SIGURG, SIGWINCH}
STOPPING = {SIGSTOP, 20, 21, 22}          # SIGTSTP, SIGTTIN, SIGTTOU: one process, no job control
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))


@dataclass
class SignalState:
    actions: dict[int, bytes] = field(default_factory=dict)   # signal: struct sigaction
    blocked: int = 0
    pending: int = 0
    altstack: bytes = bytes(STACK_T_SIZE)


def _check_signal(sig: int) -> int:
    sig = signed32(sig)
    if not 1 <= sig <= NSIG:
        raise error(errno.EINVAL)
    return sig


@syscall(13, "rt_sigaction", "int ptr ptr size")
def sys_rt_sigaction(k, sig, act, oldact, size):
    sig = _check_signal(sig)
    if size != SIGSET_SIZE:
        raise error(errno.EINVAL)
    state = k.signals
    old = state.actions.get(sig, bytes(SIGACTION.size))
    new = k.memory.read(act, SIGACTION.size) if act else None
    if new is not None and sig in (SIGKILL, SIGSTOP):
        raise error(errno.EINVAL)
    if oldact:
        k.memory.write(oldact, old)
    if new is not None:
        state.actions[sig] = new
    return 0


@syscall(14, "rt_sigprocmask", "int ptr ptr size")
def sys_rt_sigprocmask(k, how, new, old, size):
    if size != SIGSET_SIZE:
        raise error(errno.EINVAL)
    state = k.signals
    previous = state.blocked
    if new:
        mask = int.from_bytes(k.memory.read(new, SIGSET_SIZE), "little")
        match signed32(how):
            case 0:
                state.blocked |= mask
            case 1:
                state.blocked &= ~mask
            case 2:
                state.blocked = mask
            case _:
                raise error(errno.EINVAL)
        state.blocked &= ~UNBLOCKABLE
    if old:
        k.memory.write(old, previous.to_bytes(SIGSET_SIZE, "little"))
    return 0


@syscall(131, "sigaltstack", "ptr ptr")
def sys_sigaltstack(k, new, old):
    if old:
        k.memory.write(old, k.signals.altstack)
    if new:
        k.signals.altstack = k.memory.read(new, STACK_T_SIZE)
    return 0


def send_to_self(k, sig: int) -> None:
    """What happens when the guest signals itself."""
    if sig == 0:
        return
    handler = SIGACTION.unpack(k.signals.actions.get(sig, bytes(SIGACTION.size)))[0]
    if handler == SIG_IGN or (handler == SIG_DFL and sig in IGNORED_BY_DEFAULT | STOPPING):
        return
    if handler == SIG_DFL or sig == SIGKILL:
        raise GuestKilled(sig)
    k.signals.pending |= 1 << (sig - 1)


@syscall(62, "kill", "int int")
def sys_kill(k, pid, sig):
    pid, sig = signed32(pid), signed32(sig)
    if not 0 <= sig <= NSIG:
        raise error(errno.EINVAL)
    if pid in (0, -1, k.pid, -k.pid):
        send_to_self(k, sig)
        return 0
    raise error(errno.ESRCH)


@syscall(200, "tkill", "int int")
def sys_tkill(k, tid, sig):
    return sys_tgkill(k, k.pid, tid, sig)


@syscall(234, "tgkill", "int int int")
def sys_tgkill(k, tgid, tid, sig):
    if signed32(tid) != k.pid:
        raise error(errno.ESRCH)
    return sys_kill(k, tgid, sig)
