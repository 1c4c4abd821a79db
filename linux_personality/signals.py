"""Signals: dispositions, the blocked mask, pending signals, the alternate stack, the alarm.

A signal is raised by the guest itself (kill, tgkill), by a child process ending (SIGCHLD)
or by its alarm. One whose action is to be ignored is dropped; one whose default action
ends the process ends the run (GuestKilled); one with a handler stays pending until a system
call returns with it unblocked, and is delivered then as Linux does: an rt_sigframe (the
interrupted registers, the blocked mask and the FPU state) is pushed on the guest's stack and
the handler entered; rt_sigreturn undoes it. A CPU fault raises SIGSEGV (or SIGFPE, SIGILL,
SIGBUS): the backend enters the guest's handler through enter_handler if it has one, else the
fault ends the run."""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import time
from dataclasses import dataclass, field

from .cpu import GuestFault
from .paths import error
from .stops import CallInterrupted, ContextReplaced, GuestKilled
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
SIGALRM, SIGPIPE = 14, 13
# Never mirrored on the VMM process: faults of the VMM itself, SIGCHLD (children's ends are
# found with waitid), SIGPIPE (the VMM ignores it; EPIPE raises it in the guest).
UNFORWARDED = {SIGKILL, SIGSTOP, SIGCHLD, SIGPIPE, 4, 5, 7, 8, 11}
HOST_SIGRTMIN = signal.SIGRTMIN
MAX_TREE_DEPTH = 64
SA_ONSTACK, SA_NODEFER, SA_RESETHAND = 0x08000000, 0x40000000, 0x80000000
SS_ONSTACK, SS_DISABLE = 1, 2
STACK_T = struct.Struct("<QiiQ")
SIGCONTEXT_REGISTERS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi",
                        "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "rflags")
# struct ucontext (x86-64 kernel layout): flags, link, stack_t, sigcontext (registers,
# cs gs fs ss, err trapno oldmask cr2, fpstate pointer, 8 reserved), blocked mask.
UCONTEXT = struct.Struct("<QQ24s18Q4H4QQ64xQ")
SIGINFO_SIZE = 128
FRAME_SIZE = 8 + UCONTEXT.size + SIGINFO_SIZE          # pretcode, ucontext, siginfo
RED_ZONE = 128
USER_CS, USER_SS = 0x33, 0x2B
RFLAGS_USER = 0x40DD5                   # CF PF AF ZF SF TF DF OF AC: what a frame may set
RFLAGS_FIXED_IF = 0x202
SI_USER, CLD_EXITED, CLD_KILLED = 0, 1, 2
ITIMER_REAL = 0
ITIMERVAL = struct.Struct("<qqqq")      # interval (s, us), value (s, us)


@dataclass
class SignalState:
    """The guest process's signal state: handlers, masks, pending signals, alarm."""
    actions: dict[int, bytes] = field(default_factory=dict)   # signal: struct sigaction
    blocked: int = 0
    pending: int = 0
    altstack: bytes = STACK_T.pack(0, SS_DISABLE, 0, 0)
    suspended_mask: int | None = None      # the mask to restore after sigsuspend's handler
    alarm_at: float | None = None          # CLOCK_MONOTONIC deadline of ITIMER_REAL
    alarm_interval: float = 0.0
    reported_children: set[int] = field(default_factory=set)   # SIGCHLD raised for these

    def handler(self, sig: int) -> tuple[int, int, int, int]:
        return SIGACTION.unpack(self.actions.get(sig, bytes(SIGACTION.size)))

    def deliverable(self) -> int:
        """The lowest pending, unblocked signal, or 0."""
        ready = self.pending & ~self.blocked
        return (ready & -ready).bit_length()

    def reset_on_exec(self) -> None:
        """execve: handled signals go back to their default action; ignored ones stay so."""
        self.actions = {sig: action for sig, action in self.actions.items()
                        if SIGACTION.unpack(action)[0] == SIG_IGN}
        self.altstack = STACK_T.pack(0, SS_DISABLE, 0, 0)


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
        mirror_on_host(k, sig)
    return 0


def mirror_on_host(k, sig: int) -> None:
    """Give the VMM process the guest's disposition of `sig`, so that a signal another guest
    process sends (to this process's VMM) is ignored, fatal, or left pending for the guest's
    handler, as the guest asked. Signals the VMM itself uses or that host faults raise are
    left alone."""
    if sig in UNFORWARDED or sig in k.reserved_signals or sig >= HOST_SIGRTMIN:
        return
    handler = k.signals.handler(sig)[0]
    disposition = {SIG_DFL: signal.SIG_DFL, SIG_IGN: signal.SIG_IGN}.get(
        handler, lambda signum, _frame: k.host_signal(signum))
    try:
        signal.signal(sig, disposition)
    except ValueError:        # not the main thread (a VM run by the receiver's thread)
        pass


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
    """Raise `sig` in the guest process: dropped, fatal, or left pending for its handler."""
    if sig == 0:
        return
    handler = k.signals.handler(sig)[0]
    if handler == SIG_IGN or (handler == SIG_DFL and sig in IGNORED_BY_DEFAULT | STOPPING):
        return
    if handler == SIG_DFL or sig == SIGKILL:
        raise GuestKilled(sig)
    k.signals.pending |= 1 << (sig - 1)


def check_events(k) -> None:
    """Raise the signals that came due since the last call: an ended child, the alarm."""
    state = k.signals
    if state.alarm_at is not None and time.monotonic() >= state.alarm_at:
        state.alarm_at = time.monotonic() + state.alarm_interval if state.alarm_interval \
            else None
        send_to_self(k, SIGALRM)
    if k.children:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid not in state.reported_children:
            state.reported_children.add(info.si_pid)
            send_to_self(k, SIGCHLD)


def deliver(k, sig: int, result: int) -> None:
    """Return from the call with `result`, then enter the handler of `sig` on a new frame."""
    k.signals.pending &= ~(1 << (sig - 1))
    k.cpu.return_to_user(result)
    enter_handler(k, sig, struct.pack("<iiii", sig, 0, SI_USER, 0))


def handles_fault(k, sig: int) -> bool:
    """The guest has a handler for the signal a fault raises, and does not block it."""
    handler = k.signals.handler(sig)[0]
    return handler not in (SIG_DFL, SIG_IGN) and not k.signals.blocked >> (sig - 1) & 1


def enter_handler(k, sig: int, siginfo: bytes) -> None:
    """Push an rt_sigframe for the registers the CPU holds now and enter `sig`'s handler."""
    state = k.signals
    handler, flags, restorer, mask = state.handler(sig)
    regs = [k.cpu.read_register(name) for name in SIGCONTEXT_REGISTERS]
    fpu = k.cpu.read_fpu()
    sp = regs[SIGCONTEXT_REGISTERS.index("rsp")]
    ss_sp, ss_flags, _, ss_size = STACK_T.unpack(state.altstack)
    if flags & SA_ONSTACK and not ss_flags & SS_DISABLE and ss_size \
            and not ss_sp <= sp < ss_sp + ss_size:
        sp = ss_sp + ss_size
    else:
        sp -= RED_ZONE
    fpu_addr = (sp - len(fpu)) & ~63
    frame = ((fpu_addr - FRAME_SIZE) & ~15) - 8
    old_mask = state.blocked if state.suspended_mask is None else state.suspended_mask
    ucontext = UCONTEXT.pack(0, 0, state.altstack, *regs, USER_CS, 0, 0, USER_SS, 0, 0,
                             old_mask, 0, fpu_addr, old_mask)
    try:
        k.memory.write(fpu_addr, fpu)
        k.memory.write(frame, struct.pack("<Q", restorer) + ucontext
                       + siginfo.ljust(SIGINFO_SIZE, b"\0"))
    except GuestFault:            # no room for the frame (a bad alternate stack, say): as Linux
        raise GuestKilled(signal.SIGSEGV) from None     # does, the process dies by SIGSEGV
    state.suspended_mask = None
    state.blocked = (old_mask | mask | (0 if flags & SA_NODEFER else 1 << (sig - 1))) \
        & ~UNBLOCKABLE
    if flags & SA_RESETHAND:
        state.actions.pop(sig, None)
    for name, value in (("rip", handler), ("rsp", frame), ("rdi", sig),
                        ("rsi", frame + 8 + UCONTEXT.size), ("rdx", frame + 8), ("rax", 0)):
        k.cpu.write_register(name, value)


@syscall(15, "rt_sigreturn")
def sys_rt_sigreturn(k):
    """Back from a handler: the frame's registers, mask and FPU state (the pretcode was
    popped by the handler's `ret`, so RSP points at the ucontext)."""
    frame = k.cpu.read_register("rsp")
    fields = UCONTEXT.unpack(k.memory.read(frame, UCONTEXT.size))
    regs = dict(zip(SIGCONTEXT_REGISTERS, fields[3:21]))
    fpu_addr, mask = fields[-2], fields[-1]
    fpu = k.memory.read(fpu_addr, len(k.cpu.read_fpu())) if fpu_addr else None
    k.cpu.return_to_user(0)
    regs["rflags"] = (regs["rflags"] & RFLAGS_USER) | RFLAGS_FIXED_IF
    for name, value in regs.items():
        k.cpu.write_register(name, value)
    if fpu is not None:
        k.cpu.write_fpu(fpu)
    k.signals.blocked = mask & ~UNBLOCKABLE
    raise ContextReplaced()


def wait_for_signal(k) -> None:
    """Block until a signal can be delivered (a child ends, the alarm rings), or until the
    host asks the VM to stop (the call is then re-issued after the save)."""
    while True:
        check_events(k)
        if k.signals.deliverable():
            return
        pidfds = [os.pidfd_open(pid) for pid in k.children
                  if pid not in k.signals.reported_children]
        try:
            timeout = None if k.signals.alarm_at is None else \
                max(0.0, k.signals.alarm_at - time.monotonic())
            watch = pidfds + [k.signal_wake_fd] + ([k.stop_fd] if k.stop_fd is not None else [])
            ready = select.select(watch, [], [], timeout)[0]
        finally:
            for fd in pidfds:
                os.close(fd)
        if k.stop_fd is not None and k.stop_fd in ready:
            raise CallInterrupted()
        k.drain_signal_wake()


@syscall(130, "rt_sigsuspend", "ptr size")
def sys_rt_sigsuspend(k, mask_addr, size):
    if size != SIGSET_SIZE:
        raise error(errno.EINVAL)
    mask = int.from_bytes(k.memory.read(mask_addr, SIGSET_SIZE), "little")
    previous = k.signals.blocked
    k.signals.blocked = mask & ~UNBLOCKABLE
    try:
        wait_for_signal(k)
    except CallInterrupted:
        k.signals.blocked = previous
        raise
    k.signals.suspended_mask = previous
    return -errno.EINTR


@syscall(34, "pause")
def sys_pause(k):
    wait_for_signal(k)
    return -errno.EINTR


@syscall(37, "alarm", "int")
def sys_alarm(k, seconds):
    state = k.signals
    left = 0 if state.alarm_at is None else max(1, round(state.alarm_at - time.monotonic()))
    seconds &= 0xFFFFFFFF
    state.alarm_at = time.monotonic() + seconds if seconds else None
    state.alarm_interval = 0.0
    return left


def _itimer_value(state) -> bytes:
    left = 0.0 if state.alarm_at is None else max(1e-6, state.alarm_at - time.monotonic())
    interval = state.alarm_interval
    return ITIMERVAL.pack(int(interval), int(interval % 1 * 1e6), int(left), int(left % 1 * 1e6))


@syscall(36, "getitimer", "int ptr")
def sys_getitimer(k, which, value):
    if which != ITIMER_REAL:
        raise error(errno.EINVAL)
    k.memory.write(value, _itimer_value(k.signals))
    return 0


@syscall(38, "setitimer", "int ptr ptr")
def sys_setitimer(k, which, new, old):
    if which != ITIMER_REAL:
        raise error(errno.EINVAL)
    state = k.signals
    previous = _itimer_value(state)
    if new:
        i_s, i_us, v_s, v_us = ITIMERVAL.unpack(k.memory.read(new, ITIMERVAL.size))
        if min(i_s, i_us, v_s, v_us) < 0 or max(i_us, v_us) >= 10**6:
            raise error(errno.EINVAL)
        value = v_s + v_us / 1e6
        state.alarm_at = time.monotonic() + value if value else None
        state.alarm_interval = i_s + i_us / 1e6
    if old:
        k.memory.write(old, previous)
    return 0


@syscall(62, "kill", "int int")
def sys_kill(k, pid, sig):
    pid, sig = signed32(pid), signed32(sig)
    if not 0 <= sig <= NSIG:
        raise error(errno.EINVAL)
    if pid in (0, -1, k.pid, -k.pid):
        for child in k.children if pid != k.pid else ():
            os.kill(child, sig)
        send_to_self(k, sig)
        return 0
    host_pid = k.root_host_pid if abs(pid) == k.root_pid else abs(pid)
    if host_pid == k.root_host_pid or _in_guest_tree(host_pid, k.root_host_pid):
        os.kill(host_pid, sig)       # that guest's VMM: the signal's default action applies
        return 0
    raise error(errno.ESRCH)


def _in_guest_tree(host_pid: int, root_host_pid: int) -> bool:
    """A guest process of this VM: a VMM process descended from the first one (guest
    processes other than the first have their VMM's host pid)."""
    for _ in range(MAX_TREE_DEPTH):
        try:
            with open(f"/proc/{host_pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if parent == root_host_pid:
            return True
        if parent <= 1:
            return False
        host_pid = parent
    return False


@syscall(200, "tkill", "int int")
def sys_tkill(k, tid, sig):
    return sys_tgkill(k, k.pid, tid, sig)


@syscall(234, "tgkill", "int int int")
def sys_tgkill(k, tgid, tid, sig):
    if signed32(tid) != k.pid:
        raise error(errno.ESRCH)
    return sys_kill(k, tgid, sig)
