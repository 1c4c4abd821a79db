"""Where QEMU's pc and q35 machines put RAM blocks in guest physical memory (QEMU 7.2 rules):
system RAM ("pc.ram") from 0 up to the machine's low-memory limit, the rest from 4 GiB; the
BIOS ("pc.bios") just below 4 GiB. Other blocks (option ROMs, fw_cfg blobs) have no fixed
guest physical address."""

from __future__ import annotations

from dataclasses import dataclass

from .stream import RamBlock

SYSTEM_RAM = "pc.ram"
BIOS = "pc.bios"
FOUR_GIB = 1 << 32


@dataclass(frozen=True)
class Placement:
    """`length` bytes of a block from `offset` seen at guest physical `address`."""
    offset: int
    address: int
    length: int


def low_memory_limit(machine: str, ram_size: int) -> int:
    if "q35" in machine:
        return 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
    return 0xC0000000 if ram_size >= 0xE0000000 else 0xE0000000


def placements(machine: str, block: RamBlock) -> list[Placement]:
    if block.name == SYSTEM_RAM:
        below = min(block.size, low_memory_limit(machine, block.size))
        parts = [Placement(0, 0, below)]
        if block.size > below:
            parts.append(Placement(below, FOUR_GIB, block.size - below))
        return parts
    if block.name == BIOS:
        return [Placement(0, FOUR_GIB - block.size, block.size)]
    return []
