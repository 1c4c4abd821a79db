#!/usr/bin/env python3
"""Drive a real QEMU for vmstate's QEMU loop (used by examples/qemu_loop.sh and the tests).

    qemu_vm.py save OUT.state [--machine pc|q35] [--memory 128M] [--serial LOG] [--fill]
                              [--kernel qemu_guest/kernel64.bin]
        boots examples/qemu_guest/kernel.elf, waits for ticks on the serial port, then over
        QMP: stop, migrate "exec:cat > OUT.state", quit.
    qemu_vm.py resume IN.state [--machine ...] [--memory ...] [--serial LOG] [--seconds 2]
        starts the same machine with -incoming "exec:cat IN.state", `cont`, lets it run,
        quits; prints the serial output produced after the resume.

QEMU runs with TCG (the KVM here is slow for QEMU guests; see the README) and a QMP monitor
on a unix socket in a private temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = HERE / "qemu_guest" / "kernel.elf"          # 32-bit, paging off
KERNEL64 = HERE / "qemu_guest" / "kernel64.bin"      # long mode with paging (kernel64.elf: symbols)
DEFAULT_MAC = "52:54:00:12:34:56"


class QemuError(Exception):
    pass


class Qemu:
    """One qemu-system-x86_64 process with a QMP connection; use as a context manager."""

    def __init__(self, machine: str = "pc", memory: str = "128M", serial: str | Path = "serial.log",
                 kernel: str | Path | None = KERNEL, incoming: str | None = None,
                 append: str | None = None, mac: str = DEFAULT_MAC):
        self.directory = tempfile.TemporaryDirectory(prefix="vmstate-qemu-")
        self.qmp_path = os.path.join(self.directory.name, "qmp.sock")
        self.serial = Path(serial)
        command = ["qemu-system-x86_64", "-M", machine, "-m", memory, "-accel", "tcg",
                   "-nodefaults", "-display", "none", "-serial", f"file:{self.serial}",
                   "-netdev", "hubport,id=net0,hubid=0", "-device", f"rtl8139,netdev=net0,mac={mac}",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if kernel is not None:
            command += ["-kernel", str(kernel)]
        if append:
            command += ["-append", append]
        if incoming is not None:
            command += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}", "-S"]
        self.command = command
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.sock = self._connect()
        self._reader = self.sock.makefile("r")
        self._reader.readline()                       # the greeting
        self.command_qmp("qmp_capabilities")

    def _connect(self, timeout: float = 20.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise QemuError(f"QEMU exited ({self.process.returncode}): "
                                f"{self.process.stderr.read().decode().strip()}")
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.qmp_path)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise QemuError("QEMU's QMP socket did not appear") from None
                time.sleep(0.02)

    def command_qmp(self, name: str, **arguments):
        message = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self._reader.readline()
            if not line:
                raise QemuError(f"QEMU closed QMP during {name}: {self.stderr_text()}")
            reply = json.loads(line)
            if "error" in reply:
                raise QemuError(f"{name}: {reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]

    def hmp(self, command: str) -> str:
        return self.command_qmp("human-monitor-command", **{"command-line": command})

    def wait_serial(self, text: str, timeout: float = 30.0, start: int = 0) -> str:
        """Until `text` is in a complete line of the serial output: a line QEMU is still
        writing could be all that is there when the caller reads the lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.serial_lines()[start:]
            if text in output:
                return output
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise QemuError(f"serial output has no {text!r} after {timeout}s: "
                        f"{self.serial_text()[start:][-500:]!r} {self.stderr_text()}")

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_lines(self) -> str:
        """The serial output up to its last newline: QEMU may be writing the next line."""
        text = self.serial_text()
        return text[:text.rfind("\n") + 1]

    def stderr_text(self) -> str:
        if self.process.poll() is None:
            return ""
        return self.process.stderr.read().decode(errors="replace").strip()

    def save(self, path: str | Path, timeout: float = 120.0) -> None:
        """stop, then migrate "exec:cat > PATH" uncapped, waiting until it completes."""
        self.hmp("stop")
        self.command_qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        self.hmp(f'migrate "exec:cat > {shlex.quote(str(path))}"')
        self.wait_migration(timeout)

    def wait_migration(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.command_qmp("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}")
            time.sleep(0.05)
        raise QemuError("migration did not complete")

    def wait_incoming(self, timeout: float = 60.0) -> None:
        """Wait until an -incoming load has finished (the VM is then paused)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise QemuError(f"QEMU refused the incoming stream: {self.stderr_text()}")
            if self.command_qmp("query-status")["status"] != "inmigrate":
                return
            time.sleep(0.05)
        raise QemuError("the incoming migration did not finish")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.command_qmp("quit")
            except (QemuError, OSError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sock.close()
        self._reader.close()
        self.process.stderr.close()
        self.directory.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_running_guest(out: str | Path, machine: str = "pc", memory: str = "128M",
                       serial: str | Path = "serial.log", fill: bool = False,
                       ticks: int = 3, kernel: str | Path = KERNEL) -> str:
    """Boot the example guest, let it print `ticks` lines, save it; returns its serial output."""
    with Qemu(machine, memory, serial, kernel, append="fill" if fill else None) as qemu:
        qemu.wait_serial(f"tick {ticks} ", timeout=120)
        qemu.save(out)
        return qemu.serial_lines()


def resume(state: str | Path, machine: str = "pc", memory: str = "128M",
           serial: str | Path = "resumed.log", seconds: float = 2.0,
           wait_for: str = "tick ") -> str:
    """Load STATE into a new QEMU, continue it and return the serial lines it printed."""
    with Qemu(machine, memory, serial, kernel=None, incoming=state) as qemu:
        qemu.wait_incoming()
        qemu.hmp("cont")
        qemu.wait_serial(wait_for, timeout=60)
        time.sleep(seconds)
        return qemu.serial_lines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "resume"))
    parser.add_argument("state")
    parser.add_argument("--machine", default="pc")
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--serial")
    parser.add_argument("--fill", action="store_true", help="write all RAM before saving")
    parser.add_argument("--kernel", default=str(KERNEL),
                        help="the guest (default: the 32-bit kernel.elf; the 64-bit one is "
                             "qemu_guest/kernel64.bin)")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    try:
        if args.action == "save":
            output = save_running_guest(args.state, args.machine, args.memory,
                                        args.serial or "serial.log", args.fill,
                                        kernel=args.kernel)
        else:
            output = resume(args.state, args.machine, args.memory,
                            args.serial or "resumed.log", args.seconds)
    except QemuError as e:
        sys.exit(f"qemu_vm: {e}")
    sys.stdout.write(output)


if __name__ == "__main__":
    main()
