"""Cold migration between two VMM processes over real TCP sockets: the lab flow, retries,
and a hostile or broken stream on either side (nothing half-written, nothing started, the
receiver goes on serving, the sender's VM state survives)."""

import os
import re
import select
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from helpers import NETNS_RECEIVER, HoldingRelay
import xxhash

from vmstate.image import layout as L
from vmstate.migration import protocol as P

pytestmark = pytest.mark.kvm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """`vmstate receive` on a port the kernel picks (--port 0: no other test can take it
    between choosing and binding); `port` is the one its first line names."""

    def __init__(self, vmstate_cmd, cwd, *args, netns=None):
        command = [vmstate_cmd, "receive", "--port", "0", *map(str, args)]
        if netns is None:
            command += ["--bind", "127.0.0.1"]
        else:
            command = ["ip", "netns", "exec", netns] + command
        self.process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0)  # select-safe
        self.log = [self.process.stderr.readline().decode()]
        listening = re.fullmatch(r"Waiting for VM image on port ([1-9][0-9]*)\.\.\.\n",
                                 self.log[0])
        assert listening, self.log
        self.port = int(listening[1])

    def read_log_until(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stderr], [], [], 0.2)
            if not ready:
                continue
            line = self.process.stderr.readline().decode()
            if not line:
                break
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not in receiver log {self.log}")

    def bytes_stored(self) -> int:
        return bytes_stored(self.process.pid)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.mark.both_cpus
def test_lab_flow_across_two_processes(vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", sender_dir)
    sent = vmstate("run", "--migrate-to", f"127.0.0.1:{receiver.port}", example("lab_app"),
                   cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert f"VM migrated to 127.0.0.1:{receiver.port}: VM verified and started" in \
        sent.stderr.decode()
    assert receiver.process.wait(timeout=60) == 0
    receiver.read_log_until("ended: exit status 0")
    assert any(line.startswith("Received ") and line.endswith(" bytes\n") for line in receiver.log)
    assert (sender_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"
    assert sorted(p.name for p in sender_dir.iterdir()) == ["ay_caramba.txt"]   # no image


def test_port_0_reports_the_port_the_system_chose(vmstate_cmd, vmstate, example, two_dirs):
    sender_dir, receiver_dir = two_dirs
    receiver = subprocess.Popen([vmstate_cmd, "receive", "--port", "0", "--bind", "127.0.0.1",
                                 "-o", "got.sav", "--once"], cwd=receiver_dir,
                                stderr=subprocess.PIPE, text=True)
    try:
        line = receiver.stderr.readline()
        port = int(line.removeprefix("Waiting for VM image on port ").removesuffix("...\n"))
        assert port != 0, line
        sent = vmstate("run", "--migrate-to", f"127.0.0.1:{port}", example("lab_app"),
                       cwd=sender_dir)
        assert sent.returncode == 0, sent.stderr
        assert receiver.wait(timeout=60) == 0
        assert (receiver_dir / "got.sav").exists()
    finally:
        receiver.kill()
        receiver.wait()
        receiver.stderr.close()


@pytest.mark.both_cpus
def test_with_files_the_receiver_needs_nothing_from_the_sender(vmstate, example, receivers,
                                                               two_dirs):
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    sent = vmstate("run", "--with-files", "--migrate-to", f"127.0.0.1:{receiver.port}",
                   example("lab_app"), cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    assert (receiver_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"
    assert (sender_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"


def test_send_an_image_and_store_it(vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    assert vmstate("run", example("sse_keeper"), cwd=sender_dir).returncode == 0
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    sent = vmstate("send", "vm_image.sav", f"127.0.0.1:{receiver.port}", cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    assert (receiver_dir / "got.sav").read_bytes() == (sender_dir / "vm_image.sav").read_bytes()
    restored = vmstate("restore", "got.sav", cwd=receiver_dir)
    assert b"save returned 0" in restored.stdout


@pytest.mark.parametrize("layout", ["every 4th page", "random quarter"])
def test_fragmented_memory_arrives_byte_for_byte(vmstate, receivers, two_dirs, layout):
    """Thousands of runs of pages, more than one memory frame: the stored image is the sent
    one, byte for byte."""
    from strategies import layout_state, memory_views
    from vmstate.image.writer import write_image
    sender_dir, receiver_dir = two_dirs
    state, contents = layout_state(layout, pages=32768)
    write_image(str(sender_dir / "frag.sav"), state, memory_views(contents))
    assert len(state.memory[0].present.runs) > 1000
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    sent = vmstate("send", "frag.sav", f"127.0.0.1:{receiver.port}", cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    assert (receiver_dir / "got.sav").read_bytes() == (sender_dir / "frag.sav").read_bytes()


def test_sending_a_corrupt_image_stops_before_its_checksums(vmstate, receivers, two_dirs):
    """The sender checks the image's memory against its checksums as it sends it: a changed
    byte stops the stream before the CHUNKS frame, so the receiver keeps nothing."""
    from strategies import layout_state, memory_views
    from vmstate.image.reader import Image
    from vmstate.image.writer import write_image
    sender_dir, receiver_dir = two_dirs
    state, contents = layout_state("random quarter", pages=8192)
    path = sender_dir / "frag.sav"
    write_image(str(path), state, memory_views(contents))
    with Image(str(path)) as image:
        first, _ = image.state.memory[0].present.runs[100]
        offset = image.region_data[0].data_offset + first * 4096 + 7
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    sent = vmstate("send", "frag.sav", f"127.0.0.1:{receiver.port}", cwd=sender_dir)
    assert sent.returncode != 0
    assert sent.stderr.decode() == (f"vmstate: {path.name}: guest memory {first // 256 << 20:#x} "
                                    "fails its checksum (the memory is corrupt)\n")
    receiver.read_log_until("rejected VM from 127.0.0.1")
    assert sorted(p.name for p in receiver_dir.iterdir()) == []


def test_fragmented_guest_migrates_and_runs(vmstate, example, receivers, two_dirs):
    """One page in four of 128 MiB: memory frames of thousands of runs, staged and copied
    into the new guest's memory, which then checks every page."""
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir)
    sent = vmstate("run", "--memory", "256M", "--migrate-to", f"127.0.0.1:{receiver.port}",
                   example("fill_memory"), "128", "every4", cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    assert receiver.process.stdout.read() == b"128 MiB intact after restore\n"


def test_sender_retries_until_the_receiver_listens(vmstate_cmd, example, two_dirs):
    sender_dir, receiver_dir = two_dirs
    port = free_port()
    sender = subprocess.Popen([vmstate_cmd, "run", "--migrate-to", f"127.0.0.1:{port}",
                               example("lab_app")], cwd=sender_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    retries = [sender.stderr.readline() for _ in range(2)]     # it has retried twice by now
    assert retries == [b"connect failed, retry in 1 second...\n"] * 2, retries
    receiver = subprocess.Popen([vmstate_cmd, "receive", "--bind", "127.0.0.1", "--port",
                                 str(port), "--root", sender_dir, "--run", "--once"],
                                cwd=receiver_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = sender.communicate(timeout=60)
    receiver.communicate(timeout=60)
    assert sender.returncode == 0, err
    assert (sender_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


def test_unreachable_receiver_leaves_the_state_in_a_local_image(vmstate, example, two_dirs):
    sender_dir, _ = two_dirs
    sent = vmstate("run", "--connect-timeout", "2", "--migrate-to", f"127.0.0.1:{free_port()}",
                   example("lab_app"), cwd=sender_dir)
    assert sent.returncode == 125
    *retries, message = sent.stderr.decode().splitlines()
    assert retries and set(retries) == {"connect failed, retry in 1 second..."}
    assert message.startswith("vmstate: migration failed (cannot connect to 127.0.0.1:")
    assert "the VM was saved to vm_image.sav instead" in message
    assert vmstate("restore", "vm_image.sav", cwd=sender_dir).returncode == 0
    assert (sender_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"


# -- hostile streams: the receiver rejects each, keeps nothing, and serves the next -------------

def _hello(image_size=1 << 20, lo=(2, 1), hi=(2, 1), magic=P.MAGIC, flags=0):
    return P.HELLO.pack(magic, *lo, *hi, flags, image_size, 0)


def _raw_sender(port, *chunks, read_reply=True):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = []
        for chunk in chunks:
            sock.sendall(chunk)
            if read_reply and chunk is chunks[0]:
                replies.append(P.recv_reply(sock))
        return replies


def _frame(kind, offset, payload):
    return P.FRAME.pack(kind, 0, 0, offset, len(payload)) + payload


def _lab_stream(vmstate, example, directory):
    """A saved lab VM as the frames an honest sender would send: (image bytes, metadata
    frame payload (every chunk checksum zero), the memory, the memory and chunks frames, the
    end frame)."""
    from array import array
    from vmstate.image.reader import Image
    from vmstate.image.writer import with_chunk_hashes
    assert vmstate("run", example("lab_app"), cwd=directory).returncode == 0
    image = (directory / "vm_image.sav").read_bytes()
    with Image(str(directory / "vm_image.sav")) as img:
        hashes = [d.chunk_hashes for d in img.region_data]
        metadata = with_chunk_hashes(img.metadata(), [array("Q", bytes(8 * len(h)))
                                                      for h in hashes])
        present = b"".join(image[d.data_offset + first * 4096:
                                 d.data_offset + (first + count) * 4096]
                           for d, region in zip(img.region_data, img.state.memory)
                           for first, count in region.present.runs)
        final = img.metadata()
    memory = _frame(P.FRAME_MEMORY, 0, present) + \
        _frame(P.FRAME_CHUNKS, 0, b"".join(h.tobytes() for h in hashes))
    end = _frame(P.FRAME_END, 0, P.END.pack(xxhash.xxh3_64_intdigest(final),
                                            len(metadata) + len(present)))
    return image, metadata, present, memory, end


@pytest.mark.parametrize("case", ["bad magic", "newer version", "older version", "too large",
                                  "wrong length", "wrong offset", "split page", "truncated", "corrupted byte",
                                  "path outside root", "dropped after hello"])
def test_hostile_stream_is_rejected_and_the_receiver_goes_on(vmstate, example, receivers,
                                                             two_dirs, case):
    sender_dir, receiver_dir = two_dirs
    image, metadata, present, memory, end = _lab_stream(vmstate, example, sender_dir)
    receiver = receivers(receiver_dir, "-o", "got.sav", "--max-size", "100M")
    port = receiver.port
    frame = _frame
    good_hello = _hello(len(image))
    expected = {
        "bad magic": ("bad magic", lambda: _raw_sender(port, _hello(magic=b"NOTVMST\0"))),
        "newer version": ("speaks protocol 3.0-3.0",
                          lambda: _raw_sender(port, _hello(lo=(3, 0), hi=(3, 0)))),
        "older version": ("speaks protocol 2.0-2.0, this receiver 2.1",
                          lambda: _raw_sender(port, _hello(lo=(2, 0), hi=(2, 0)))),
        "too large": ("larger than --max-size", lambda: _raw_sender(port, _hello(200 << 20))),
        "wrong length": ("a table longer than the 100-byte metadata frame",
                         lambda: _raw_sender(port, good_hello,
                                             frame(P.FRAME_IMAGE, 0, metadata[:100]))),
        "wrong offset": ("not the next whole pages",
                         lambda: _raw_sender(port, good_hello, frame(P.FRAME_IMAGE, 0, metadata),
                                             frame(P.FRAME_MEMORY, 4096, present[:4096]))),
        "split page": ("not the next whole pages",
                       lambda: _raw_sender(port, good_hello, frame(P.FRAME_IMAGE, 0, metadata),
                                           frame(P.FRAME_MEMORY, 0, present[:100]))),
        "truncated": ("truncated stream",
                      lambda: _raw_sender(port, good_hello, frame(P.FRAME_IMAGE, 0, metadata),
                                          memory[:len(memory) // 2])),
        "corrupted byte": ("fails its checksum",
                           lambda: _raw_sender(port, good_hello, frame(P.FRAME_IMAGE, 0, metadata),
                                               bytes([memory[0] ^ 0])
                                               + memory[1:500] + bytes([memory[500] ^ 1])
                                               + memory[501:], end)),
        "path outside root": ("not one of the guest's open files",
                              lambda: _raw_sender(port, _hello(len(image), flags=P.FLAG_WITH_FILES),
                                                  frame(P.FRAME_IMAGE, 0, metadata), memory,
                                                  frame(P.FRAME_FILE, 0,
                                                        P.FILE_HEADER.pack(9, 0o644, 1, 0)
                                                        + b"../escape" + b"x"))),
        "dropped after hello": ("truncated stream", lambda: _raw_sender(port, good_hello)),
    }
    reason, attack = expected[case]
    try:
        attack()
    except (ConnectionError, OSError, P.ProtocolError):
        pass                                      # the receiver may hang up on us
    line = receiver.read_log_until("rejected VM from 127.0.0.1")
    assert reason in line, line
    assert sorted(p.name for p in receiver_dir.iterdir()) == []
    assert not (sender_dir.parent / "escape").exists()
    # ...and the same receiver takes the next, honest sender.
    sent = vmstate("send", "vm_image.sav", f"127.0.0.1:{port}", cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    assert "VM verified and stored as got.sav" in sent.stderr.decode()   # named before the reply
    assert (receiver_dir / "got.sav").read_bytes() == image


def _trickle(sock, stop, interval=0.2):
    """Send one byte every `interval` seconds until the receiver hangs up or `stop` is set."""
    try:
        while not stop.wait(interval):
            sock.sendall(b"\0")
    except OSError:
        pass


@pytest.mark.parametrize("case", ["silent", "one byte at a time"])
def test_a_slow_sender_costs_a_slot_for_seconds_never_the_service(vmstate, example, receivers,
                                                                 two_dirs, case):
    sender_dir, receiver_dir = two_dirs
    image, metadata, *_ = _lab_stream(vmstate, example, sender_dir)
    receiver = receivers(receiver_dir, "-o", "got.sav")
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as slow:
        if case == "one byte at a time":
            slow.sendall(_hello(len(image)))
            assert P.recv_reply(slow)[0] == P.STATUS_OK
            threading.Thread(target=_trickle, args=(slow, stop), daemon=True).start()
        # ...while it is connected, an honest sender is served at once.
        sent = vmstate("send", "vm_image.sav", f"127.0.0.1:{receiver.port}",
                       "--connect-timeout", "0", cwd=sender_dir)
        assert sent.returncode == 0, sent.stderr
        assert (receiver_dir / "got.sav").read_bytes() == image
        line = receiver.read_log_until("rejected VM from 127.0.0.1", timeout=60)
        stop.set()
    # The receiver's own clock says when it dropped the slow one (the test's would count the
    # honest sender's run too, which a loaded machine can make last longer than the deadline).
    if case == "silent":
        assert "no complete hello within 3 s" in line, line
    else:
        dropped = re.search(r"too slow: [0-9]+ bytes in ([0-9.]+) s \(--min-rate is 1048576 "
                            r"bytes/s after 3 s\)", line)
        assert dropped and float(dropped[1]) >= 3, line      # after the grace, not before
    assert not any("rejected" in entry for entry in receiver.log[:-1]), receiver.log


def _peak_memory(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def test_metadata_frame_is_bounded_by_the_image_header(receivers, tmp_path):
    """A 64 GiB image announced with a 256 MiB metadata frame whose header and table make
    the metadata 4 KiB: refused after 96 bytes, without holding 256 MiB."""
    receiver = receivers(tmp_path, "-o", "got.sav")
    header = L.HEADER.pack(L.MAGIC, 1, 0, L.HEADER.size, 1, 0, L.HEADER.size, 64 << 30, 0, 0)
    table = L.SECTION_ENTRY.pack(L.MEMORY_REGION, 0, 0, 96, 32, 0)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(_hello(64 << 30))
        assert P.recv_reply(sock)[0] == P.STATUS_OK
        sock.sendall(P.FRAME.pack(P.FRAME_IMAGE, 0, 0, 0, 256 << 20) + header + table)
        status, message = P.recv_reply(sock)
    assert status == P.STATUS_FAILED
    assert "make the metadata 4096 bytes" in message
    receiver.read_log_until("rejected VM from 127.0.0.1")
    assert _peak_memory(receiver.process.pid) < 200 << 20


def test_receiver_killed_mid_transfer(vmstate_cmd, vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    relay = HoldingRelay(receiver.port, 200 << 20)
    sender = subprocess.Popen([vmstate_cmd, "run", "--memory", "2G", "--migrate-to",
                               f"127.0.0.1:{relay.port}", example("fill_memory"), "1500"],
                              cwd=sender_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when_transferring(receiver, relay, receiver.process)
    _, err = sender.communicate(timeout=120)
    assert sender.returncode == 125
    assert "the VM was saved to vm_image.sav instead" in err.decode()
    assert sorted(p.name for p in receiver_dir.iterdir()) == []     # no half image
    restored = vmstate("restore", "vm_image.sav", cwd=sender_dir, timeout=120)
    assert restored.stdout == b"1500 MiB intact after restore\n"


def test_sender_killed_mid_transfer(vmstate_cmd, vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    assert vmstate("run", "--memory", "2G", example("fill_memory"), "1500",
                   cwd=sender_dir).returncode == 0
    image = sender_dir / "vm_image.sav"
    size_before = image.stat().st_size
    receiver = receivers(receiver_dir, "-o", "got.sav")
    relay = HoldingRelay(receiver.port, 200 << 20)
    sender = subprocess.Popen([vmstate_cmd, "send", "vm_image.sav", f"127.0.0.1:{relay.port}"],
                              cwd=sender_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when_transferring(receiver, relay, sender)
    relay.release()                     # what the sender sent before it died, then its end
    receiver.read_log_until("rejected VM from 127.0.0.1")
    assert sorted(p.name for p in receiver_dir.iterdir()) == []
    assert image.stat().st_size == size_before
    resent = vmstate("send", "vm_image.sav", f"127.0.0.1:{receiver.port}", cwd=sender_dir,
                     timeout=120)
    assert resent.returncode == 0, resent.stderr


def bytes_stored(pid: int) -> int:
    """The most disk any regular file the process holds open takes (its image being received
    has no name yet, but it is open)."""
    most = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            most = max(most, st.st_blocks * 512)
    return most


def _kill_when_transferring(receiver, relay, victim, threshold=100 << 20, timeout=90):
    """SIGKILL `victim` once the relay holds back the rest of the VM and the receiver has
    stored `threshold` bytes of it: mid-transfer for certain (killed as the receiver's
    file reached 200 MiB of 1.5 GiB, a loaded machine could let the transfer end first)."""
    assert relay.holding.wait(timeout), "the transfer never started"
    deadline = time.monotonic() + timeout
    while receiver.bytes_stored() < threshold:
        assert time.monotonic() < deadline, "the receiver stored nothing"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


# -- two hosts: network namespaces joined by a veth pair ---------------------------------------

def test_lab_flow_between_two_network_namespaces_with_files(vmstate_cmd, example, receivers,
                                                            two_dirs, namespaces):
    ns_sender, ns_receiver = namespaces
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--run", "--once", "--root", receiver_dir,
                         netns=ns_receiver)
    sent = subprocess.run(["ip", "netns", "exec", ns_sender, vmstate_cmd, "run", "--with-files",
                           "--migrate-to", f"{NETNS_RECEIVER}:{receiver.port}",
                           example("lab_app")],
                          cwd=sender_dir, capture_output=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert receiver.process.wait(timeout=60) == 0
    assert (receiver_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\nBye Bye !!!\n"
    assert (sender_dir / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"
    unreachable = subprocess.run(["ip", "netns", "exec", ns_sender, "python3", "-c",
                                  "import socket; socket.create_connection(('127.0.0.1', "
                                  f"{receiver.port}), timeout=2)"], capture_output=True)
    assert unreachable.returncode != 0          # the receiver really is on another "host"


def test_file_modes_from_a_peer_lose_set_id_bits(vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    image, metadata, _, memory, end = _lab_stream(vmstate, example, sender_dir)
    receiver = receivers(receiver_dir, "-o", "got.sav", "--once")
    content = b"Hello World !!!\n"
    file_frame = _frame(P.FRAME_FILE, 0, P.FILE_HEADER.pack(14, 0o6777, len(content),
                                                            xxhash.xxh3_64_intdigest(content))
                        + b"ay_caramba.txt" + content)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(_hello(len(image), flags=P.FLAG_WITH_FILES))
        assert P.recv_reply(sock)[0] == P.STATUS_OK
        sock.sendall(_frame(P.FRAME_IMAGE, 0, metadata) + memory + file_frame + end)
        assert P.recv_reply(sock) == (P.STATUS_OK, "VM verified and stored as got.sav")
    received = receiver_dir / "ay_caramba.txt"
    assert received.read_bytes() == content
    mode = stat.S_IMODE(received.stat().st_mode)
    assert mode & 0o7000 == 0 and mode & 0o700 == 0o700       # no set-id bits; umask applies


def test_a_carried_file_never_replaces_the_received_image(vmstate, example, receivers, two_dirs):
    sender_dir, receiver_dir = two_dirs
    assert vmstate("run", example("lab_app"), cwd=sender_dir).returncode == 0
    receiver = receivers(receiver_dir, "-o", "ay_caramba.txt", "--once")
    sent = vmstate("send", "--with-files", "vm_image.sav", f"127.0.0.1:{receiver.port}",
                   cwd=sender_dir)
    assert sent.returncode == 125
    assert "guest file 'ay_caramba.txt' is the output image ay_caramba.txt" in sent.stderr.decode()
    assert receiver.process.wait(timeout=30) == 125
    assert sorted(p.name for p in receiver_dir.iterdir()) == []
