"""System calls that do not return to the guest now: the backend's run loop handles these."""


class GuestExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class SaveRequested(Exception):
    """The guest asked for a SAVE (syscall 400)."""


class CallInterrupted(Exception):
    """A blocking call was interrupted by a host request to stop the VM; the guest will
    re-issue it when it resumes."""


class GuestKilled(Exception):
    """A signal's default action ended the guest process."""
    def __init__(self, signal: int):
        super().__init__(signal)
        self.signal = signal


class ContextReplaced(Exception):
    """The call set the CPU's whole context itself (execve, rt_sigreturn): there is no result
    to return."""
