"""One registry of the formats vmstate reads and writes. Every command that takes a saved VM
(info, split, gdb) finds its format here by the file's first bytes (`probe`); join finds it by
the root element of the hardware XML. Each format reads into the shared model
(vmstate.formats.model) and splits/joins its own files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import FormatError
from ..fd import open_to_read

PROBE_BYTES = 16


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    magic: bytes
    xml_root: str
    read: Callable        # path -> model.Machine
    info: Callable        # (path, as_json, instructions) -> text
    split: Callable       # (path, core, xml) -> message
    join: Callable        # (core, xml, xml_bytes, output or None, symbols) -> summary
    new_suffix: str       # what join's output is usually called: new.sav, new.state

    def probe(self, head: bytes) -> bool:
        return head.startswith(self.magic)


def _formats() -> list[Format]:
    from . import qemu_stream, vmstate_image
    return [vmstate_image.FORMAT, qemu_stream.FORMAT]


def probe(head: bytes) -> Format | None:
    """The format whose magic `head` (a file's first bytes) starts with, if any."""
    return next((f for f in _formats() if f.probe(head)), None)


def detect(path: str) -> Format:
    """The format of the file at `path`, by its magic; refused in one line if none fits."""
    with os.fdopen(open_to_read(path, "image file", FormatError), "rb") as f:
        head = f.read(PROBE_BYTES)
    found = probe(head)
    if found is not None:
        return found
    known = ", ".join(f"{f.title} ({f.magic!r})" for f in _formats())
    raise FormatError(f"unknown magic {head[:8]!r}: not a saved VM this version reads "
                      f"(known: {known})", f"{path}: offset 0x0")


def for_xml_root(tag: str, source: str) -> Format:
    for candidate in _formats():
        if candidate.xml_root == tag:
            return candidate
    raise FormatError(f"root element <{tag}> is not a hardware document vmstate writes "
                      f"({', '.join('<' + f.xml_root + '>' for f in _formats())})",
                      f"{source}:1")
