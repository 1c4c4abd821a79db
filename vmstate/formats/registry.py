"""One registry of the formats vmstate reads and writes. Every command that takes a saved VM
(info, split, gdb) finds its format here by the file's first bytes (`probe`); join finds it by
the root element of the hardware XML. Each format reads into the shared model
(vmstate.formats.model) and splits/joins its own files."""

from __future__ import annotations

import os
from importlib import import_module

from ..errors import FormatError
from ..fd import open_to_read
from ..image.layout import MAGIC as IMAGE_MAGIC
from ..qemu.layout import MAGIC as QEMU_MAGIC
from ..record import record

PROBE_BYTES = 16


@record
class Format:
    """A format, by what recognises it; its code (`module`, in this package: read, info,
    split, join) is imported when first used, so a command imports only its file's format."""
    name: str
    title: str
    magic: bytes
    xml_root: str
    new_suffix: str       # what join's output is usually called: new.sav, new.state
    module: str

    def probe(self, head: bytes) -> bool:
        return head.startswith(self.magic)

    def read(self, path: str):
        """The file at `path` in the shared model (vmstate.formats.model.Machine)."""
        return self._code().read(path)

    def info(self, path: str, as_json: bool, instructions: int = 8) -> str:
        return self._code().info(path, as_json, instructions)

    def split(self, path: str, core: str, xml: str) -> str:
        """Writes `core` and `xml`; returns the message saying so."""
        return self._code().split(path, core, xml)

    def join(self, core: str, xml: str, xml_data: bytes, output: str | None, symbols) -> str:
        """Writes `output` (none: a dry run); returns the summary of the changes."""
        return self._code().join(core, xml, xml_data, output, symbols)

    def _code(self):
        return import_module(f"{__package__}.{self.module}")


FORMATS = (
    Format("vmstate-image", "vmstate image", IMAGE_MAGIC, "vmstate-hardware", ".sav",
           "vmstate_image"),
    Format("qemu-stream", "QEMU 7.2 migration stream", QEMU_MAGIC, "qemu-state", ".state",
           "qemu_stream"),
)


def probe(head: bytes) -> Format | None:
    """The format whose magic `head` (a file's first bytes) starts with, if any."""
    return next((f for f in FORMATS if f.probe(head)), None)


def detect(path: str) -> Format:
    """The format of the file at `path`, by its magic; refused in one line if none fits."""
    with os.fdopen(open_to_read(path, "image file", FormatError), "rb") as f:
        head = f.read(PROBE_BYTES)
    found = probe(head)
    if found is not None:
        return found
    known = ", ".join(f"{f.title} ({f.magic!r})" for f in FORMATS)
    raise FormatError(f"unknown magic {head[:8]!r}: not a saved VM this version reads "
                      f"(known: {known})", f"{path}: offset 0x0")


def for_xml_root(tag: str, source: str) -> Format:
    for candidate in FORMATS:
        if candidate.xml_root == tag:
            return candidate
    raise FormatError(f"root element <{tag}> is not a hardware document vmstate writes "
                      f"({', '.join('<' + f.xml_root + '>' for f in FORMATS)})",
                      f"{source}:1")
