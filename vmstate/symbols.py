"""Symbol names for guest addresses, from the program's ELF symbol table."""

from __future__ import annotations

import bisect
import os

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .errors import VmstateError
from .fd import open_to_read


class Symbols:
    def __init__(self, path: str):
        entries = []
        try:
            with os.fdopen(open_to_read(path, "file", VmstateError), "rb") as f:
                for section in ELFFile(f).iter_sections():
                    if isinstance(section, SymbolTableSection):
                        entries += [(s["st_value"], s["st_size"], s.name) for s in
                                    section.iter_symbols()
                                    if s.name and s["st_info"]["type"] in ("STT_FUNC",
                                                                           "STT_OBJECT")]
        except (OSError, ELFError) as e:
            raise VmstateError(f"{path}: cannot read symbols: {e}") from None
        entries.sort()
        self._starts = [start for start, _, _ in entries]
        self._entries = entries

    def in_range(self, start: int, end: int) -> list[str]:
        """Names of the symbols that overlap [start, end), by address."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        return [name for s, size, name in self._entries[first:bisect.bisect_left(self._starts, end)]
                if s + max(size, 1) > start]
