"""`vmstate ctl`: the client of a VMM's control socket (kvm_backend/control.py, specified in
schemas/control-protocol.md). One command per call: connect, read the greeting, send the
request, print the reply."""

from __future__ import annotations

import json
import socket

from .errors import FileMissingError, VmstateError

REPLY_TIMEOUT = 600.0            # a save or migration of a large VM takes a while


class ControlError(VmstateError):
    """The VMM answered with an error (or not at all)."""


def arguments_from(words: list[str]) -> dict:
    """KEY=VALUE words as the request's arguments; a bare first word is the VM's name.
    Values that parse as JSON (numbers, true/false) are taken as such."""
    arguments: dict = {}
    for index, word in enumerate(words):
        key, equals, value = word.partition("=")
        if not equals:
            if index == 0:
                arguments["vm"] = word
                continue
            raise VmstateError(f"argument {word!r}: expected KEY=VALUE")
        try:
            arguments[key] = json.loads(value) if value[:1] in "0123456789tfn-" else value
        except ValueError:
            arguments[key] = value
    return arguments


def request(path: str, command: str, arguments: dict, timeout: float = REPLY_TIMEOUT) -> dict:
    """Send one command; returns the whole reply ({"return": ...} or {"error": ...})."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise FileMissingError(f"{path}: no such control socket") from None
    except OSError as e:
        raise ControlError(f"{path}: cannot connect: {e.strerror}") from None
    with sock, sock.makefile("rwb", buffering=0) as stream:
        try:
            greeting = _read(stream, path)
            if "error" in greeting:
                return greeting
            stream.write(json.dumps({"execute": command, "arguments": arguments}).encode()
                         + b"\n")
            return _read(stream, path)
        except (OSError, socket.timeout) as e:
            raise ControlError(f"{path}: {e}") from None


def _read(stream, path: str) -> dict:
    line = stream.readline()
    if not line:
        raise ControlError(f"{path}: the VMM closed the connection")
    try:
        return json.loads(line)
    except ValueError:
        raise ControlError(f"{path}: not a vmstate control socket (bad reply)") from None


def render(reply: dict) -> str:
    """A reply for people: query-vms as a table, a dump's text as is, others as JSON."""
    value = reply["return"]
    if isinstance(value, list):
        return "\n".join(f"{vm['name']:<16} {vm['state']:<8} {vm['slices']:>8} slices "
                         f"{vm['run_seconds']:>10.3f} s  {vm['description']}" for vm in value)
    if isinstance(value, dict) and "text" in value:
        return value["text"].rstrip("\n")
    return json.dumps(value) if value else "ok"
