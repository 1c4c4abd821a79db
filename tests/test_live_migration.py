"""Live migration (protocol 3.0) between two VMM processes over real sockets: a guest that
writes a numbered, time-stamped sequence to a file, to stdout and to memory continues it on
the receiver without a gap or a repeat (loopback, and two network namespaces); a guest that
dirties memory faster than the link still migrates; a receiver killed mid-way leaves the
guest running on the source; a hostile 3.0 stream is refused and nothing is started."""

import subprocess
import time

import pytest

from helpers import NETNS_RECEIVER, HoldingRelay
import xxhash

from test_migration import free_port
from vmstate.migration import protocol as P

pytestmark = pytest.mark.kvm

STEPS, SAVE_AT = 1500, 100


@pytest.fixture
def counter(guest):
    return guest("live_counter")


def sequence(text: str) -> list[int]:
    """The step numbers of "step timestamp" lines."""
    return [int(line.split()[0]) for line in text.splitlines() if line and line[0].isdigit()]


def check_continued(sender, receiver, receiver_dir, steps=STEPS):
    """The sender's stdout and the receiver's continue one sequence; the file carried along
    holds all of it; the guest found its memory intact."""
    out, err = sender.stdout.decode(), sender.stderr.decode()
    assert sender.returncode == 0, err
    assert "VM verified and started" in err
    assert "live: round 0:" in err and "downtime" in err
    assert receiver.process.wait(timeout=120) == 0
    received = receiver.process.stdout.read().decode()
    assert f"intact: {steps} steps, " in received.splitlines()[-1], received[-200:]
    here, there = sequence(out), sequence(received)
    assert here and there, (out[-200:], received[:200])
    assert here + there == list(range(steps))
    assert sequence((receiver_dir / "sequence.txt").read_text()) == list(range(steps))
    return err


def run_live(vmstate_cmd, directory, address, *guest_args, options=(), netns=None, timeout=180):
    command = [vmstate_cmd, "run", "--with-files", "--live", "--migrate-to", address, *options,
               *map(str, guest_args)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns] + command
    return subprocess.run(command, cwd=directory, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("receiver_cpu", ["kvm", "soft"])
def test_live_migration_over_loopback_continues_the_sequence(vmstate_cmd, counter, receivers,
                                                             two_dirs, receiver_cpu):
    """A KVM sender; the receiver runs the guest on KVM, or on the software CPU."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir,
                         "--cpu", receiver_cpu)
    sent = run_live(vmstate_cmd, sender_dir, f"127.0.0.1:{receiver.port}", "--memory", "256M",
                    counter, STEPS, SAVE_AT, 16, 64)
    err = check_continued(sent, receiver, receiver_dir)
    assert "converged" in err
    # the source stopped at the hand-over: its copy of the file ends where the guest left it
    # (perhaps one line further than its stdout, if it stopped between the two writes)
    left = len(sequence(sent.stdout.decode()))
    assert sequence((sender_dir / "sequence.txt").read_text()) in (list(range(left)),
                                                                 list(range(left + 1)))


@pytest.mark.parametrize("receiver_cpu", ["kvm", "soft"])
def test_live_migration_from_the_software_cpu(vmstate_cmd, counter, receivers, two_dirs,
                                              receiver_cpu):
    """A software-CPU sender (its dirty log: the D bits of the guest's page tables) to a KVM
    receiver and to a software one: the sequence goes on, the guest finds its memory intact."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir,
                         "--cpu", receiver_cpu)
    sent = run_live(vmstate_cmd, sender_dir, f"127.0.0.1:{receiver.port}", "--cpu", "soft",
                    "--memory", "256M", counter, STEPS, SAVE_AT, 16, 64)
    check_continued(sent, receiver, receiver_dir)      # the guest checks all it wrote


def test_live_migration_on_sigusr1(vmstate_cmd, counter, receivers, two_dirs):
    """--save-on-signal: SIGUSR1 starts the live migration (the guest never asks for SAVE)."""
    import signal
    from types import SimpleNamespace
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    sender = subprocess.Popen([vmstate_cmd, "run", "--with-files", "--live", "--save-on-signal",
                               "--migrate-to", f"127.0.0.1:{receiver.port}", "--memory", "256M",
                               counter, str(STEPS), "-1", "16", "64"], cwd=sender_dir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (sender_dir / "sequence.txt").exists() or \
            len((sender_dir / "sequence.txt").read_text().splitlines()) < 200:
        assert time.monotonic() < deadline and sender.poll() is None, "the guest did not start"
        time.sleep(0.02)
    sender.send_signal(signal.SIGUSR1)
    out, err = sender.communicate(timeout=180)
    check_continued(SimpleNamespace(stdout=out, stderr=err, returncode=sender.returncode),
                    receiver, receiver_dir)


def test_a_restored_vm_migrates_live(vmstate_cmd, vmstate, counter, receivers, two_dirs):
    """run (saved at step 100) -> restore --live, migrated on SIGUSR1 -> the receiver: one
    sequence across three processes; round 0 sends the pages present in the image."""
    import signal
    from types import SimpleNamespace
    sender_dir, receiver_dir = two_dirs
    saved = vmstate("run", "--memory", "256M", counter, STEPS, SAVE_AT, 16, 64, cwd=sender_dir)
    assert saved.returncode == 0, saved.stderr
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    restored = subprocess.Popen([vmstate_cmd, "restore", "--with-files", "--live",
                                 "--save-on-signal", "--migrate-to",
                                 f"127.0.0.1:{receiver.port}", "vm_image.sav"], cwd=sender_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len((sender_dir / "sequence.txt").read_text().splitlines()) < SAVE_AT + 100:
        assert time.monotonic() < deadline and restored.poll() is None, "no progress"
        time.sleep(0.02)
    restored.send_signal(signal.SIGUSR1)
    out, err = restored.communicate(timeout=180)
    round0 = next(line for line in err.decode().splitlines() if line.startswith("live: round 0"))
    assert float(round0.split()[3]) >= 64            # the image's 64 MiB buffer was present
    check_continued(SimpleNamespace(stdout=saved.stdout + out, stderr=err,
                                    returncode=restored.returncode), receiver, receiver_dir)


def test_live_migration_between_two_network_namespaces(vmstate_cmd, counter, receivers,
                                                       two_dirs, namespaces):
    ns_sender, ns_receiver = namespaces
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir,
                         netns=ns_receiver)
    sent = run_live(vmstate_cmd, sender_dir, f"{NETNS_RECEIVER}:{receiver.port}", "--memory",
                    "256M", counter, STEPS, SAVE_AT, 16, 64, netns=ns_sender)
    check_continued(sent, receiver, receiver_dir)


def test_a_guest_dirtying_faster_than_the_link_still_migrates(vmstate_cmd, counter, receivers,
                                                              two_dirs):
    """Every page of a 32 MiB buffer rewritten at every step (every 200 us), and a 1 ms
    downtime asked: the rounds never converge, the migration ends by a final stop-and-copy,
    reported."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    started = time.monotonic()
    sent = run_live(vmstate_cmd, sender_dir, f"127.0.0.1:{receiver.port}", "--memory", "256M",
                    counter, STEPS, 30, -1, 32, 200, options=("--max-downtime", "1"))
    err = check_continued(sent, receiver, receiver_dir)
    assert "did not converge: final stop-and-copy" in err
    rounds = [line for line in err.splitlines() if line.startswith("live: round ")]
    assert 2 <= len(rounds) <= 30
    assert time.monotonic() - started < 150


def test_receiver_killed_mid_way_leaves_the_guest_running_here(vmstate_cmd, counter, receivers,
                                                               two_dirs):
    """The receiver is killed once 64 MiB of round 0's 768 have reached it (the rest held
    back by a relay: the whole migration took 0.3 s, and a kill timed by watching the
    receiver's memory grow could come after the hand-over)."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    relay = HoldingRelay(receiver.port, 64 << 20)
    sender = subprocess.Popen([vmstate_cmd, "run", "--with-files", "--live", "--migrate-to",
                               f"127.0.0.1:{relay.port}", "--memory", "1G", counter, "3000",
                               str(SAVE_AT), "16", "768"], cwd=sender_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert relay.holding.wait(120), "no transfer seen"
    deadline = time.monotonic() + 60
    while _resident(receiver.process.pid) < 64 << 20:      # the pages reached the receiver
        assert time.monotonic() < deadline, "the receiver did not take the pages"
        time.sleep(0.01)
    receiver.process.kill()
    out, err = sender.communicate(timeout=180)
    assert sender.returncode == 0, err
    assert "failed (" in err.decode() and "the VM carries on here" in err.decode()
    assert sequence(out.decode()) == list(range(3000))
    assert out.decode().endswith(" page writes\n") and "intact: 3000 steps" in out.decode()
    assert sequence((sender_dir / "sequence.txt").read_text()) == list(range(3000))
    assert list(receiver_dir.iterdir()) == []


def test_a_guest_that_ends_first_ends_the_migration(vmstate_cmd, counter, receivers, two_dirs):
    """The guest exits on the source while round 0 is still going: its exit status is
    vmstate's, the migration is abandoned, the receiver keeps nothing."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    sent = run_live(vmstate_cmd, sender_dir, f"127.0.0.1:{receiver.port}", "--memory", "1G",
                    counter, SAVE_AT + 2, SAVE_AT, 0, 768, 0)
    assert sent.returncode == 0, sent.stderr
    assert "abandoned: the guest ended on this host first" in sent.stderr.decode()
    assert sequence(sent.stdout.decode()) == list(range(SAVE_AT + 2))
    receiver.read_log_until("rejected VM from 127.0.0.1")
    assert receiver.process.wait(timeout=60) == 125
    assert list(receiver_dir.iterdir()) == []


def test_unreachable_receiver_leaves_the_guest_running_here(vmstate_cmd, counter, two_dirs):
    sender_dir, _ = two_dirs
    sent = run_live(vmstate_cmd, sender_dir, f"127.0.0.1:{free_port()}", counter, 600, SAVE_AT,
                    0, 1, options=("--connect-timeout", "1"))
    assert sent.returncode == 0, sent.stderr
    assert "cannot connect to 127.0.0.1" in sent.stderr.decode()
    assert "the VM carries on here" in sent.stderr.decode()
    assert sequence(sent.stdout.decode()) == list(range(600))
    assert not (sender_dir / "vm_image.sav").exists()


def _resident(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


# -- a hostile 3.0 sender ---------------------------------------------------------------------

def _frame(kind, payload, flags=0, check=None):
    check = xxhash.xxh3_64_intdigest(payload) if check is None else check
    return P.FRAME.pack(kind, flags, 0, check, len(payload)) + payload


def _pages(numbers, data, check=None):
    payload = b"".join(P.PAGE_NUMBER.pack(n) for n in numbers) + data
    return _frame(P.FRAME_PAGES, payload, check=check)


def _live_stream(vmstate, example, directory):
    """A saved lab VM as an honest live sender would send it: hello, layout, one round of
    pages, state (without memory), end (with the memory's digest); the pieces to break."""
    from dataclasses import replace

    import numpy as np

    from vmstate.image.reader import Image
    from vmstate.image.writer import plan_image
    from vmstate.migration.page_digests import PageDigests
    assert vmstate("run", example("lab_app"), cwd=directory).returncode == 0
    with Image(str(directory / "vm_image.sav")) as image:
        full_metadata = image.metadata()
        metadata = plan_image(replace(image.state, memory=()), []).metadata
        region = image.state.memory[0]
        view = image.region_view(0)
        numbers = [page for first, count in region.present.runs for page in range(first,
                                                                             first + count)]
        data = b"".join(bytes(view[n * 4096:(n + 1) * 4096]) for n in numbers)
        size = region.size
    digests = PageDigests(size // 4096)
    digests.update(np.array(numbers), np.frombuffer(data, np.uint8).reshape(-1, 4096))
    hello = P.HELLO.pack(P.MAGIC, *P.LIVE_VERSION, *P.LIVE_VERSION, 0, size, 0)
    layout = _frame(P.FRAME_LAYOUT, P.LAYOUT_REGION.pack(0, size))
    return hello, layout, numbers, data, metadata, full_metadata, digests.digest()


def _end(digest, *frames):
    payload_bytes = sum(P.FRAME.unpack_from(f)[4] for f in frames)
    return _frame(P.FRAME_END, P.LIVE_END.pack(len(frames), payload_bytes, digest))


def _send_raw(port, hello, *frames):
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(hello)
        status, message = P.recv_reply(sock)
        if status != P.STATUS_OK:
            return status, message
        try:
            for frame in frames:
                sock.sendall(frame)
        except OSError:
            pass
        return P.recv_reply(sock)


@pytest.mark.parametrize("case", ["honest", "corrupted page", "page outside memory",
                                  "pages not ascending", "page missing", "stale page",
                                  "pages before layout", "end miscounts", "no state",
                                  "state with memory", "flags set"])
def test_hostile_live_stream_is_refused_and_nothing_runs(vmstate, example, receivers, two_dirs,
                                                         case):
    sender_dir, receiver_dir = two_dirs
    hello, layout, numbers, data, metadata, full_metadata, digest = _live_stream(
        vmstate, example, sender_dir)
    receiver = receivers(sender_dir, "--run", "--once", "--root", sender_dir)
    pages = _pages(numbers, data)
    state = _frame(P.FRAME_STATE, metadata)
    flipped = bytearray(data)
    flipped[5000] ^= 1
    broken = {
        "honest": [layout, pages, state],
        "corrupted page": [layout, _pages(numbers, bytes(flipped),
                                          check=xxhash.xxh3_64_intdigest(
                                              b"".join(P.PAGE_NUMBER.pack(n) for n in numbers)
                                              + data)), state],
        "page outside memory": [layout, _pages([numbers[0], 1 << 40], data[:8192]), state],
        "pages not ascending": [layout, _pages(numbers[::-1], data), state],
        "page missing": [layout, _pages(numbers[1:], data[4096:]), state],
        "stale page": [layout, _pages(numbers, bytes(flipped)), state],   # consistent frame
        "pages before layout": [pages, layout, state],
        "no state": [layout, pages],
        "state with memory": [layout, pages, _frame(P.FRAME_STATE, full_metadata)],
        "flags set": [layout, _frame(P.FRAME_PAGES, pages[P.FRAME.size:], flags=1), state],
    }
    frames = broken.get(case, [layout, pages, state])
    end = _end(digest, *frames)
    if case == "end miscounts":
        end = _frame(P.FRAME_END, P.LIVE_END.pack(len(frames) + 1, 0, digest))
    status, message = _send_raw(receiver.port, hello, *frames, end)
    expected = {
        "honest": "VM verified and started",
        "corrupted page": "fails its check: corrupted in transit",
        "page outside memory": "page numbers outside guest memory or not ascending",
        "pages not ascending": "page numbers outside guest memory or not ascending",
        "page missing": "differs from the sender's final memory",
        "stale page": "differs from the sender's final memory",
        "pages before layout": "the first frame must be the memory layout",
        "end miscounts": "the end frame counts",
        "no state": "unexpected frame of type 3",
        "state with memory": "the final state describes memory",
        "flags set": "non-zero flags",
    }[case]
    assert expected in message, message
    assert receiver.process.wait(timeout=60) == (0 if case == "honest" else 125)
    if case == "honest":
        receiver.read_log_until("ended: exit status 0")
    else:
        assert status == P.STATUS_FAILED
        receiver.read_log_until("rejected VM from 127.0.0.1")
        assert "ended:" not in "".join(receiver.log)


def test_an_image_receiver_refuses_a_live_sender_clearly(vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    hello = _live_stream(vmstate, example, sender_dir)[0]
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    status, message = _send_raw(receiver.port, hello)
    assert status == P.STATUS_REFUSED
    assert message == ("the sender speaks protocol 3.0-3.0, this receiver 2.1 (a live "
                       "migration needs vmstate receive --run)")


def test_the_receivers_pace_counts_scattered_reads():
    """Memory received straight into guest pages (recvmsg_into) counts towards --min-rate's
    pace: a 1 GiB guest sent in more than 3 s was refused as "too slow" when it did not."""
    import socket

    from vmstate.migration.receive import PacedSocket
    a, b = socket.socketpair()
    with a, b:
        paced = PacedSocket(b, 1 << 20)
        a.sendall(b"x" * 10000)
        buffers = [memoryview(bytearray(4000)), memoryview(bytearray(6000))]
        received = 0
        while received < 10000:
            received += paced.recvmsg_into(buffers)[0]
        assert paced.received == 10000


@pytest.mark.parametrize("args, message", [
    (["--live", "--migrate-to", "127.0.0.1:9", "--max-downtime", "0"],
     "vmstate: --max-downtime 0: must be more than 0 and at most 60000 ms")])
def test_bad_live_options_are_usage_errors(vmstate, example, args, message):
    result = vmstate("run", *args, example("hello"))
    assert result.returncode == 2
    assert result.stderr.decode() == message + "\n"
