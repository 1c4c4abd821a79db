"""The binary layout of a QEMU 7.2 migration stream, declared once (big-endian throughout).
schemas/qemu-stream.md describes it in full."""

from __future__ import annotations

import itertools
import struct

MAGIC = b"QEVM"
VERSION = 3
HEADER = struct.Struct(">4sI")          # magic, version

# Top-level markers
EOF_MARK = 0x00
SECTION_START = 0x01                   # id, name, instance id, version id, then data
SECTION_PART = 0x02                    # id, then data
SECTION_END = 0x03                     # id, then data
SECTION_FULL = 0x04                    # id, name, instance id, version id, then data
SUBSECTION = 0x05                      # name, version id, then data
VMDESCRIPTION = 0x06                   # be32 length, JSON
CONFIGURATION = 0x07                   # be32 length, machine type name
FOOTER = 0x7E                          # be32 section id after every section's data

NAMED_SECTIONS = (SECTION_START, SECTION_FULL)
SECTION_KIND_NAMES = {SECTION_START: "start", SECTION_PART: "part", SECTION_END: "end",
                      SECTION_FULL: "full"}
SECTION_KINDS = {name: kind for kind, name in SECTION_KIND_NAMES.items()}

U8 = struct.Struct(">B")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
SECTION_IDS = struct.Struct(">II")     # instance id, version id

# The "ram" section (version 4): page records, each be64 (offset within the block | flags)
RAM_SECTION = "ram"
RAM_VERSION = 4
RAM_ZERO = 0x02                        # one fill byte follows: the whole page holds it
RAM_MEM_SIZE = 0x04                    # start: total size, then each block's name and size
RAM_PAGE = 0x08                        # the page's 4096 bytes follow
RAM_EOS = 0x10                         # end of this part of the section
RAM_CONTINUE = 0x20                    # same block as the previous record: no name
RAM_FLAG_MASK = 0xFFF                  # flags live in the low bits of the page offset
RAM_KNOWN_FLAGS = RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE
PAGE_SIZE = 4096
PAGE_RECORD = U64.size + PAGE_SIZE     # a PAGE record of the current block
ZERO_RECORD = U64.size + 1             # a ZERO record of the current block


def page_headers(first_header: int, count: int) -> bytes:
    """The headers of `count` records that continue a run, back to back: be64 `first_header`
    (offset | flags), then a page further each."""
    return struct.pack(f">{count}Q", *range(first_header, first_header + count * PAGE_SIZE,
                                            PAGE_SIZE))


def zero_records(first_header: int, count: int, fill: int) -> bytes:
    """`count` ZERO records that continue a run: each its be64 header, then the fill byte."""
    headers = range(first_header, first_header + count * PAGE_SIZE, PAGE_SIZE)
    return struct.pack(">" + "QB" * count, *itertools.chain.from_iterable(
        zip(headers, itertools.repeat(fill))))
