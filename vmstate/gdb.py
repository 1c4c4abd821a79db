"""`vmstate gdb`: gdb on a split core, in write mode, the program loaded for symbols only."""

from __future__ import annotations

import os
import shutil
import sys

from .core import Core
from .errors import FileMissingError, FormatError, VmstateError
from .fd import open_to_read
from .formats.registry import PROBE_BYTES, probe
from .split import DEFAULT_CORE, DEFAULT_XML


def gdb_command(core: str, program: str, extra: list[str]) -> list[str]:
    """`symbol-file`, not `file`: with no executable target, a write to an address the core
    does not hold fails instead of silently patching the program file."""
    return ["gdb", "-q", "-write", "-ex", f"symbol-file {program}", "-ex", f"core-file {core}",
            *extra]


def run_gdb(target: str, program: str | None, extra: list[str]) -> None:
    """Replaces this process with gdb."""
    if shutil.which("gdb") is None:
        raise VmstateError("gdb is not installed (Debian: apt-get install gdb)")
    with os.fdopen(open_to_read(target, "image or core file", FormatError), "rb") as f:
        saved = probe(f.read(PROBE_BYTES))
    core = target
    if saved is not None:
        from .atomic import refuse_clobbering
        refuse_clobbering({"the core": DEFAULT_CORE, "the XML": DEFAULT_XML},
                          {"the image": target})
        saved.split(target, DEFAULT_CORE, DEFAULT_XML)
        core = DEFAULT_CORE
        print(f"vmstate: split {target} into {DEFAULT_CORE} and {DEFAULT_XML}; after editing: "
              f"vmstate join {DEFAULT_CORE} {DEFAULT_XML} -o new{saved.new_suffix}", file=sys.stderr)
    if program is None:
        try:
            with Core(core) as opened:
                program = opened.source.state.vmm.program
        except FormatError:
            raise VmstateError(f"{core} records no guest program: name the kernel or program "
                               "with --app") from None
    if not os.path.exists(program):
        raise FileMissingError(f"{program}: the guest program is needed for symbols (--app)")
    sys.stdout.flush()
    os.execvp("gdb", gdb_command(core, program, extra))
