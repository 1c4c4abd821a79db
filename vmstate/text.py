"""Showing text that comes from a guest or a file system (paths, argv), which may hold any
bytes: escaped for a terminal, and losslessly for JSON."""

from __future__ import annotations

import base64
import os

_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord('"'): '\\"'}


def escape(value: str) -> str:
    """Printable ASCII as itself; backslash, quote, newline and tab as C escapes; any other
    byte of the name (control characters, UTF-8, undecodable bytes) as \\xNN."""
    return "".join(_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\x{b:02x}")
                   for b in os.fsencode(value))


def json_text(key: str, value: str) -> dict:
    """{key: valid text} and, when the name's bytes are not UTF-8, {key_base64: its bytes}:
    the text replaces each undecodable byte with U+FFFD, the base64 form is exact."""
    raw = os.fsencode(value)
    try:
        return {key: raw.decode()}
    except UnicodeDecodeError:
        return {key: raw.decode(errors="replace"),
                f"{key}_base64": base64.b64encode(raw).decode()}


def from_json_text(data: dict, key: str) -> str:
    """The name json_text stored under `key`, exactly."""
    if f"{key}_base64" in data:
        return os.fsdecode(base64.b64decode(data[f"{key}_base64"]))
    return data[key]
