"""Assertions and waits shared by the tests."""

import os
import time


def one_line_error(result) -> str:
    """Assert the command failed with exactly one line on stderr and no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmstate: "), stderr
    return lines[0]


NETNS_SENDER, NETNS_RECEIVER = "10.231.0.1", "10.231.0.2"   # the `namespaces` fixture's hosts


def wait_until_blocked(pid: int, still: float = 0.4, timeout: float = 60) -> None:
    """Until the VMM process has slept for `still` seconds on end: the guest is then blocked
    in its call (a fixed sleep could end before a loaded machine got there, and a signal
    that came before the VMM's handler would kill it)."""
    deadline, asleep_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        now = time.monotonic()
        asleep_since = (asleep_since or now) if state == "S" else None
        if asleep_since is not None and now - asleep_since >= still:
            return
        time.sleep(0.02)
    raise AssertionError(f"the VMM (pid {pid}) never blocked")


def cpu_seconds(pid: int) -> float:
    """User and system time the process has used so far (a KVM guest's time counts as user
    time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_computing(pid: int, seconds: float = 0.1, timeout: float = 60) -> None:
    """Until the process has used `seconds` more of CPU time: a guest that only computes is
    then in its loop, however long a loaded machine took to run it that far (a fixed sleep
    measures the wrong clock: the guest may have had all of it, or none)."""
    start, deadline = cpu_seconds(pid), time.monotonic() + timeout
    while cpu_seconds(pid) - start < seconds:
        assert time.monotonic() < deadline, f"process {pid} did not compute"
        time.sleep(0.01)
