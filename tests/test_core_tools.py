"""A split core read by the tools people use on Linux process cores: drgn, eu-stack
(elfutils), gdb, and the notes they rely on (NT_AUXV, NT_FILE, NT_SIGINFO, NT_PRPSINFO)."""

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

pytestmark = pytest.mark.kvm

DRGN = Path(sys.executable).parent / "drgn"
AT_PHDR, AT_PHNUM, AT_ENTRY = 3, 5, 9


@pytest.fixture
def lab_core(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app"), "one", "two").returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    return tmp_path / "vm.core"


def _notes(core: Path) -> dict[str, bytes]:
    with open(core, "rb") as f:
        segment = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_NOTE")
        return {note["n_type"]: note["n_descdata"] for note in segment.iter_notes()
                if note["n_name"] == "CORE"}


def _build_id(program: str) -> str:
    with open(program, "rb") as f:
        section = ELFFile(f).get_section_by_name(".note.gnu.build-id")
        return next(section.iter_notes())["n_desc"]


def test_the_example_guests_have_a_build_id(example):
    assert re.fullmatch(r"[0-9a-f]{40}", _build_id(example("lab_app")))


def test_notes_of_a_linux_process_core(lab_core, example):
    program = example("lab_app")
    notes = _notes(lab_core)
    with open(program, "rb") as f:
        elf = ELFFile(f)
        loads = [s.header for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        entry, phnum, phoff = elf["e_entry"], elf["e_phnum"], elf["e_phoff"]
    auxv = dict(struct.iter_unpack("<QQ", notes["NT_AUXV"]))
    assert auxv[AT_ENTRY] == entry and auxv[AT_PHNUM] == phnum
    assert auxv[AT_PHDR] == loads[0]["p_vaddr"] + phoff          # what the loader built
    assert notes["NT_AUXV"][-16:] == bytes(16)                     # ends with AT_NULL
    count, page = struct.unpack_from("<QQ", notes["NT_FILE"])
    entries = [struct.unpack_from("<QQQ", notes["NT_FILE"], 16 + 24 * i) for i in range(count)]
    names = notes["NT_FILE"][16 + 24 * count:].split(b"\0")[:count]
    assert page == 4096 and names == [program.encode()] * count
    assert [start for start, _, _ in entries] == [h["p_vaddr"] & ~0xFFF for h in loads]
    assert struct.unpack_from("<iii", notes["NT_SIGINFO"]) == (19, 0, 0)     # SIGSTOP
    psargs = notes["NT_PRPSINFO"][56:136].rstrip(b"\0")
    assert psargs == f"{program} one two".encode()


def test_drgn_prints_a_symbolized_stack_trace(lab_core, example):
    assert DRGN.exists(), "drgn is not installed (make setup installs the test extras)"
    script = ("print(prog.main_module().build_id.hex()); "
              "print(prog.crashed_thread().stack_trace())")
    result = subprocess.run([DRGN, "-q", "-c", lab_core, "-s", example("lab_app"), "-e", script],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == _build_id(example("lab_app"))           # matched by its build ID
    assert re.match(r"#0 +vmstate_save \(.*lab_app\.c:\d+", lines[1]), result.stdout
    assert re.match(r"#1 +main \(.*lab_app\.c:\d+", lines[2]), result.stdout


def test_eu_stack_unwinds_like_gdb(lab_core, example):
    if shutil.which("eu-stack") is None:
        pytest.fail("eu-stack is not installed (make setup installs elfutils)")
    result = subprocess.run(["eu-stack", "-m", "-s", "--core", lab_core, "-e",
                             example("lab_app")], capture_output=True, text=True, timeout=60)
    frames = re.findall(r"#(\d+) +0x([0-9a-f]+) (\w+)", result.stdout)
    assert [(n, name) for n, _, name in frames[:3]] == [
        ("0", "vmstate_save"), ("1", "main"), ("2", "libc_start_main_stage2")], result.stdout
    gdb = subprocess.run(["gdb", "-q", "-batch", "-nx", "-ex", f"symbol-file {example('lab_app')}",
                          "-ex", f"core-file {lab_core}", "-ex", "bt"],
                         capture_output=True, text=True, timeout=60)
    caller = re.search(r"#1 +0x([0-9a-f]+) in main", gdb.stdout)
    assert caller and int(caller[1], 16) == int(frames[1][1], 16), gdb.stdout
