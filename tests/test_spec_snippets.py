"""The code in the specs under schemas/ runs on what vmstate writes today: each snippet is
taken from its spec and run against fresh output, so a format change that leaves a spec
behind fails here."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def python_snippet(spec: str, heading: str) -> str:
    """The first ```python block after `heading` in schemas/SPEC."""
    text = (SCHEMAS / spec).read_text()
    section = text[text.index(heading):]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match, f"no python block after {heading!r} in {spec}"
    return match.group(1)


@pytest.mark.kvm
def test_the_image_specs_minimal_check_passes_on_a_fresh_image(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    snippet = python_snippet("image-format.md", "## 11. Worked example")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    image = json.loads(vmstate("info", "--json", "vm_image.sav").stdout)["image"]
    assert ran.stdout.strip() == (f"format {image['format']}, {image['sections']} sections, "
                                  f"image digest {image['digest']}")


class Recorder:
    """A relay on a free loopback port that forwards one connection to `port` and records
    what the sender sent."""

    def __init__(self, port: int):
        self.target, self.sent = port, bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        with self.listener, self.listener.accept()[0] as sender, \
                socket.create_connection(("127.0.0.1", self.target)) as receiver:
            back = threading.Thread(target=self._pump, args=(receiver, sender, bytearray()))
            back.start()
            self._pump(sender, receiver, self.sent)
            back.join()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        while data := source.recv(1 << 20):
            record += data
            sink.sendall(data)
        with contextlib.suppress(OSError):      # the other side may be gone already
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.kvm
@pytest.mark.parametrize("with_files", [False, True])
def test_the_migration_specs_decoder_checks_a_recorded_stream(vmstate, example, receivers,
                                                              two_dirs, with_files):
    sender_dir, receiver_dir = two_dirs
    receiver = receivers(receiver_dir, "--root", receiver_dir, "-o", "got.sav", "--once")
    recorder = Recorder(receiver.port)
    sent = vmstate("run", "--migrate-to", f"127.0.0.1:{recorder.port}",
                   *(["--with-files"] if with_files else []), example("lab_app"), cwd=sender_dir)
    assert sent.returncode == 0, sent.stderr
    recorder.thread.join(timeout=60)
    (sender_dir / "cap.c2s").write_bytes(recorder.sent)
    snippet = python_snippet("migration-protocol.md", "## 9. Worked example")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=sender_dir, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    image = json.loads(vmstate("info", "--json", receiver_dir / "got.sav").stdout)
    present = sum(region["present_pages"] for region in image["memory"])
    files = ["ay_caramba.txt"] if with_files else []
    assert ran.stdout.strip().endswith(f"{present} pages, 64 chunks, files {files}, image digest "
                                       f"{image['image']['digest']}")
