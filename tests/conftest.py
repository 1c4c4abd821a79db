"""Shared fixtures: the KVM probe behind the `kvm` marker, the installed `vmstate` command,
the guest programs built from examples/ and tests/guests/, and the `both_cpus` marker that
runs a test's guests once on KVM and once on the software CPU."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import NETNS_RECEIVER, NETNS_SENDER

# Property tests judge results, never time: Hypothesis's default 200 ms deadline per example
# and its too-slow health check fail a test whose examples a loaded machine runs slowly
# (pages' large byte maps take a Python loop over up to 400 000 bytes). And a run's examples
# are the same every time (derandomize), so a test run passes or fails on the code alone;
# tests/fuzz explores at random. Loaded here, before the test modules: their own @settings
# start from this profile.
settings.register_profile("vmstate", deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmstate")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
GUESTS = REPO / "tests" / "guests"


def _probe_kvm() -> str | None:
    """None if a VM can be created, else the reason it cannot."""
    try:
        from kvm_backend.kvm import Kvm, KvmUnavailable
    except Exception as e:    # pragma: no cover - import problems are reported as the reason
        return f"cannot import kvm_backend: {e}"
    try:
        with Kvm() as kvm:
            kvm.create_vm().close()
    except KvmUnavailable as e:
        return str(e)
    return None


_KVM_MISSING = _probe_kvm()


def pytest_sessionstart(session):
    """Say loudly that KVM tests will not run, or stop at once when CI requires them."""
    if _KVM_MISSING is None:
        return
    if os.environ.get("VMSTATE_REQUIRE_KVM") == "1":
        pytest.exit(f"VMSTATE_REQUIRE_KVM=1 but KVM is unavailable: {_KVM_MISSING}",
                    returncode=1)
    print(f"\n*** KVM TESTS WILL BE SKIPPED: {_KVM_MISSING} ***\n", file=sys.stderr)


def pytest_collection_modifyitems(config, items):
    if _KVM_MISSING is None:
        return
    skip = pytest.mark.skip(reason=f"KVM unavailable: {_KVM_MISSING}")
    for item in items:
        if "kvm" in item.keywords and _cpu_of(item) != "soft":
            item.add_marker(skip)


def _cpu_of(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("cpu") if callspec is not None else None


def pytest_generate_tests(metafunc):
    """A test marked `both_cpus` runs twice: cpu=kvm (a `kvm` test) and cpu=soft."""
    if metafunc.definition.get_closest_marker("both_cpus"):
        metafunc.parametrize("cpu", ["kvm", "soft"], indirect=True)


@pytest.fixture(autouse=True)
def cpu(request, monkeypatch) -> str | None:
    """The CPU this test's `vmstate` commands run guests on (VMSTATE_CPU, which --cpu reads),
    for tests marked `both_cpus`; None (the commands' default) for the others."""
    value = getattr(request, "param", None)
    if value is not None:
        monkeypatch.setenv("VMSTATE_CPU", value)
    return value


@pytest.fixture(scope="session")
def vmstate_cmd() -> str:
    """The installed console script (next to this Python, as `pip install` put it)."""
    candidate = Path(sys.executable).parent / "vmstate"
    found = str(candidate) if candidate.exists() else shutil.which("vmstate")
    if not found:
        pytest.fail("the vmstate command is not installed (run `make setup`)")
    return found


@pytest.fixture(scope="session")
def built_guests() -> None:
    for directory in (EXAMPLES, GUESTS):
        subprocess.run(["make", "-s", "-C", str(directory)], check=True)


@pytest.fixture
def example(built_guests):
    return lambda name: str(EXAMPLES / name)


@pytest.fixture
def guest(built_guests):
    return lambda name: str(GUESTS / name)


@pytest.fixture
def vmstate(vmstate_cmd, tmp_path):
    """Run `vmstate ARGS...` in a scratch directory; returns the CompletedProcess."""
    def run(*args, input: bytes | None = None, cwd: Path | None = None, env=None,
            timeout: float = 120):
        return subprocess.run([vmstate_cmd, *map(str, args)], input=input,
                              capture_output=True, cwd=cwd or tmp_path, timeout=timeout,
                              env={**os.environ, **(env or {})})
    return run


@pytest.fixture
def namespaces():
    """Two hosts: network namespaces with random names, joined by a veth pair; the sender's
    address is NETNS_SENDER, the receiver's NETNS_RECEIVER."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"lv{secrets.token_hex(4)}"
    a, b = f"{tag}a", f"{tag}b"
    commands = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", f"{tag}x", "netns", a, "type", "veth", "peer", "name", f"{tag}y",
         "netns", b],
        ["ip", "-n", a, "addr", "add", f"{NETNS_SENDER}/24", "dev", f"{tag}x"],
        ["ip", "-n", b, "addr", "add", f"{NETNS_RECEIVER}/24", "dev", f"{tag}y"],
        ["ip", "-n", a, "link", "set", f"{tag}x", "up"],
        ["ip", "-n", b, "link", "set", f"{tag}y", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot set up network namespaces here: {' '.join(command)}: "
                            f"{result.stderr.strip()}")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def receivers(vmstate_cmd):
    """start(cwd, *args, netns=None): a `vmstate receive` (test_migration.Receiver), stopped
    after the test."""
    from test_migration import Receiver
    started = []

    def start(cwd, *args, netns=None):
        started.append(Receiver(vmstate_cmd, cwd, *args, netns=netns))
        return started[-1]
    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def two_dirs(tmp_path):
    """A sender's and a receiver's directory."""
    sender, receiver = tmp_path / "sender", tmp_path / "receiver"
    sender.mkdir()
    receiver.mkdir()
    return sender, receiver
