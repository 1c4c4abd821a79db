"""A hostile migration peer: mutated replays of a real sender's stream, sent over loopback to
a real `vmstate receive -o` (not part of the default test run).

Usage, from the worktree:

    .venv/bin/python tests/fuzz/fuzz_receiver.py IMAGE SEED COUNT WORKDIR

Records what `vmstate send IMAGE` sends (HELLO and every frame up to END), then replays it
COUNT times with seeded mutations (bit flips in the headers and metadata, frame lengths and
offsets set to hostile values, frames dropped, repeated or cut short) to one receiver that
serves them all. Reports every receiver log line holding a traceback or an "internal error",
any case where the receiver stops serving, and any stored output (none of these streams is
valid, so nothing may be written under the output name).
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vmstate.migration import protocol as P  # noqa: E402

VMSTATE = str(Path(sys.executable).parent / "vmstate")
HOSTILE = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 4095, 4096, 64 << 20, (64 << 20) + 1]


def record(image: str) -> tuple[bytes, list[tuple[int, int, int, int, int, bytes]]]:
    """(HELLO, frames) as `vmstate send` sends them; each frame (type, flags, reserved,
    offset, length, payload)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    result = {}

    def serve():
        connection, _ = server.accept()
        with connection:
            hello = P.recv_exact(connection, P.HELLO.size, "hello")
            connection.sendall(P.REPLY.pack(P.STATUS_OK, 0))
            frames = []
            while True:
                header = P.FRAME.unpack(P.recv_exact(connection, P.FRAME.size, "frame"))
                frames.append((*header, P.recv_exact(connection, header[4], "payload")))
                if header[0] == P.FRAME_END:
                    break
            result["stream"] = hello, frames
    thread = threading.Thread(target=serve)
    thread.start()
    subprocess.run([VMSTATE, "send", image, f"127.0.0.1:{port}"], capture_output=True,
                   timeout=120)
    thread.join()
    server.close()
    return result["stream"]


def mutate(hello: bytes, frames: list, rng: random.Random) -> tuple[bytes, str]:
    """The stream with one mutation, and what it was."""
    hello, frames = bytearray(hello), [list(frame) for frame in frames]
    action = rng.randrange(7)
    frame = rng.choice(frames)
    what = f"action {action} on a frame of type {frame[0]}"
    if action == 0:
        hello[rng.randrange(len(hello))] ^= 1 << rng.randrange(8)
    elif action == 1:                               # a header field set to a hostile value
        field = rng.choice((0, 1, 2, 3, 4))
        what += f": header field {field} set"
        frame[field] = rng.choice(HOSTILE) % (1 << (16 if field < 2 else 32 if field == 2
                                                    else 64))
    elif action == 2 and frame[5]:                  # a bit flip in a payload's first 64 KiB
        payload = bytearray(frame[5])
        payload[rng.randrange(min(len(payload), 65536))] ^= 1 << rng.randrange(8)
        frame[5] = bytes(payload)
    elif action == 3:
        frames.remove(frame)
    elif action == 4:
        frames.insert(frames.index(frame), list(frame))
    elif action == 5:
        rng.shuffle(frames)
    data = bytes(hello) + b"".join(P.FRAME.pack(*f[:5]) + f[5] for f in frames)
    if action == 6:
        data = data[:rng.randrange(len(data))]
    return data, what


def replay(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data[:P.HELLO.size])
            sock.recv(P.REPLY.size + P.MAX_REPLY)
            sock.sendall(data[P.HELLO.size:])
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass


def fuzz(image: str, seed: int, count: int, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    hello, frames = record(image)
    receiver = subprocess.Popen([VMSTATE, "receive", "--port", "0", "--bind", "127.0.0.1",
                                 "-o", "received.sav", "--max-senders", "1"],
                                cwd=workdir, stderr=subprocess.PIPE, bufsize=0)
    first = receiver.stderr.readline().decode()
    port = int(re.search(r"port (\d+)", first)[1])
    rng, findings = random.Random(seed), 0
    try:
        for case in range(count):
            data, what = mutate(hello, frames, rng)
            replay(port, data)
            lines = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready, _, _ = select.select([receiver.stderr], [], [], 0.5)
                if not ready:
                    if lines:
                        break
                    continue
                line = receiver.stderr.readline().decode()
                if not line:
                    break
                lines.append(line)
            text = "".join(lines)
            stored = sorted(p.name for p in workdir.iterdir())
            if text.startswith("Received") and stored == ["received.sav"]:
                print(f"case {case}: accepted after {what}", flush=True)   # a harmless change
                os.unlink(workdir / "received.sav")
                continue
            if "internal error" in text or "Traceback" in text or receiver.poll() is not None \
                    or stored:
                findings += 1
                (workdir.parent / f"finding-{seed}-{case}.bin").write_bytes(data)
                print(f"case {case}: {what}: {text.strip()[:1500]} stored={stored} "
                      f"alive={receiver.poll() is None}", flush=True)
                for name in stored:
                    os.unlink(workdir / name)
                if receiver.poll() is not None:
                    break
    finally:
        receiver.kill()
        receiver.wait()
    print(f"receiver: {count} cases, {findings} findings", flush=True)
    return findings


if __name__ == "__main__":
    fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]).resolve())
