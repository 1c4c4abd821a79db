"""split, gdb, join, restore: the loop as a user runs it, with the real gdb, and the core
checked by readers other than ours (pyelftools, LIEF, readelf)."""

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import lief
import pytest
from elftools.elf.elffile import ELFFile

from helpers import one_line_error
from vmstate.core import DIRECT_MAP_BASE

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not shutil.which("gdb"), reason="gdb is not installed")]


def gdb_batch(program, core, *commands, write=False):
    args = ["gdb", "-q", "-batch", "-nx"] + (["-write"] if write else [])
    args += ["-ex", f"symbol-file {program}", "-ex", f"core-file {core}"]
    for command in commands:
        args += ["-ex", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def lab_split(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    result = vmstate("split", "vm_image.sav")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_gdb_sees_the_application(lab_split, example):
    result = gdb_batch(example("lab_app"), lab_split / "vm.core", "bt", "info registers rip cs",
                       "p bye", "p hello")
    assert "warning" not in result.stderr.lower(), result.stderr
    assert re.search(r"#0 +vmstate_save \(\) at lab_app\.c", result.stdout)
    assert re.search(r"#1 +0x[0-9a-f]+ in main \(\) at lab_app\.c:\d+", result.stdout)
    assert re.search(r"cs +0x33", result.stdout)
    assert '"Bye Bye !!!\\n"' in result.stdout and '"Hello World !!!\\n"' in result.stdout


@pytest.mark.both_cpus
def test_lab_loop_gdb_patch_and_xml_file_edit_both_take_effect(vmstate, lab_split, example):
    patched = gdb_batch(example("lab_app"), lab_split / "vm.core",
                        'set var *(char (*)[13]) bye = "Ciao Ciao!!\\n"', write=True)
    assert patched.returncode == 0, patched.stderr
    edit(lab_split / "hw.xml", 'path="ay_caramba.txt" flags="0x8042" mode="0777" offset="16"',
         'path="moved.txt" flags="0x8042" mode="0777" offset="4"')
    (lab_split / "moved.txt").write_bytes(b"0123456789")
    joined = vmstate("join", "--app", example("lab_app"), "vm.core", "hw.xml", "-o", "new.sav")
    assert joined.returncode == 0, joined.stderr
    summary = joined.stdout.decode()
    assert "file fd 3 path: ay_caramba.txt -> moved.txt" in summary
    assert "file fd 3 offset: 0x10 -> 0x4" in summary
    assert re.search(r"memory page 0x402000 changed \(virtual 0x402000\)", summary)
    restored = vmstate("restore", "new.sav")
    assert restored.returncode == 0, restored.stderr
    assert (lab_split / "moved.txt").read_bytes() == b"0123Ciao Ciao!!\n"
    assert (lab_split / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"


@pytest.mark.both_cpus
def test_register_edit_is_seen_by_the_program(vmstate, example, tmp_path):
    assert vmstate("run", example("sse_keeper")).returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    edit(tmp_path / "hw.xml", '<reg name="rax" value="0x0"/>', '<reg name="rax" value="0x2a"/>')
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "new.sav")
    assert "vcpu 0 rax: 0x0 -> 0x2a" in joined.stdout.decode()
    restored = vmstate("restore", "new.sav")
    assert b"save returned 42" in restored.stdout, restored.stderr


@pytest.mark.both_cpus
def test_variable_patched_in_gdb_is_seen_after_restore(vmstate, example, tmp_path):
    assert vmstate("run", example("sse_keeper")).returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    patched = gdb_batch(example("sse_keeper"), tmp_path / "vm.core", "set var counter = 7",
                        'set var message = "patched by gdb"', write=True)
    assert patched.returncode == 0, patched.stderr
    assert vmstate("join", "vm.core", "hw.xml", "-o", "new.sav").returncode == 0
    restored = vmstate("restore", "new.sav")
    assert b'counter = 8, save returned 0, message = "patched by gdb"' in restored.stdout


@pytest.mark.parametrize("name, args", [("lab_app", []), ("sse_keeper", []),
                                        ("fill_memory", ["3"]), ("hello", [])])
def test_join_of_split_is_byte_identical_on_real_images(vmstate, example, guest, tmp_path,
                                                        name, args):
    program = example(name) if name != "hello" else guest("save_twice")
    assert vmstate("run", program, *args).returncode == 0
    assert vmstate("split", "vm_image.sav").returncode == 0
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "again.sav")
    assert joined.stdout == b"no changes: the image is rebuilt as it was\n", joined.stderr
    assert (tmp_path / "again.sav").read_bytes() == (tmp_path / "vm_image.sav").read_bytes()


def test_other_readers_accept_the_core(lab_split):
    core = lab_split / "vm.core"
    with open(core, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        notes = [n["n_type"] for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"
                 for n in s.iter_notes()]
    assert any(s["p_vaddr"] == DIRECT_MAP_BASE for s in loads)
    assert any(s["p_vaddr"] == 0x400000 or s["p_vaddr"] <= 0x400000 < s["p_vaddr"] + s["p_memsz"]
               for s in loads)
    assert {"NT_PRSTATUS", "NT_PRPSINFO", "NT_FPREGSET"} <= set(notes)
    parsed = lief.parse(str(core))
    assert parsed is not None and len(parsed.segments) == len(loads) + 1
    assert any(note.type == lief.ELF.Note.TYPE.CORE_PRSTATUS for note in parsed.notes)
    readelf = subprocess.run(["readelf", "-W", "-n", "-l", str(core)], capture_output=True,
                             text=True)
    assert readelf.returncode == 0 and not readelf.stderr
    assert "NT_PRSTATUS" in readelf.stdout and "NT_X86_XSTATE" in readelf.stdout


def test_vmstate_gdb_command_splits_and_protects_the_program(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    program_bytes = open(example("lab_app"), "rb").read()
    result = vmstate("gdb", "vm_image.sav", "--", "-batch", "-nx", "-ex", "bt",
                     "-ex", "set var *(int *)0x10 = 5")
    assert re.search(r"in main \(\) at lab_app\.c", result.stdout.decode())
    assert "Cannot access memory at address 0x10" in result.stderr.decode()
    assert open(example("lab_app"), "rb").read() == program_bytes
    assert (tmp_path / "vm.core").exists() and (tmp_path / "hw.xml").exists()


# -- what join refuses ----------------------------------------------------------------------

def _refused(vmstate, tmp_path, *args):
    result = vmstate("join", *args, "vm.core", "hw.xml", "-o", "out.sav")
    assert result.returncode == 125
    assert not (tmp_path / "out.sav").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    return one_line_error(result)


@pytest.mark.parametrize("old, new, expected", [
    ('<reg name="rip" value="0x', '<reg name="rip" value="0x80000000', "is not a canonical address"),
    ('<reg name="cr0" value="0x80010033"/>', '<reg name="cr0" value="0x10033"/>',
     "lacks PE or PG: long mode needs paging"),
    ('<reg name="efer" value="0x501"/>', '<reg name="efer" value="0x1"/>', "lacks LME or LMA"),
    ('path="ay_caramba.txt"', 'path="../outside.txt"', "is outside the guest root"),
    ('<reg name="rax" value="0x0"/>', '<reg name="rax" value="zero"/>', "hw.xml:"),
])
def test_unrunnable_edits_are_refused_with_file_and_line(vmstate, lab_split, old, new, expected):
    edit(lab_split / "hw.xml", old, new)
    message = _refused(vmstate, lab_split)
    assert re.search(r"hw\.xml:\d+: ", message), message
    assert expected in message


def test_core_that_is_not_ours(vmstate, lab_split, example):
    shutil.copy(example("lab_app"), lab_split / "vm.core")
    assert "not an x86-64 ELF core file" in _refused(vmstate, lab_split)
    (lab_split / "vm.core").write_bytes(b"plain text")
    assert "vm.core" in _refused(vmstate, lab_split)


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo], ids=["directory", "fifo"])
def test_a_directory_or_fifo_is_not_a_core(vmstate, lab_split, make):
    (lab_split / "vm.core").unlink()
    make(lab_split / "vm.core")                 # a FIFO must not block the reader
    assert "vm.core: not a regular file" in _refused(vmstate, lab_split)
    opened = vmstate("gdb", "vm.core", "--", "-batch")
    assert opened.returncode == 125
    assert "vm.core: not a regular file" in one_line_error(opened)


def test_program_header_offset_near_2_64(vmstate, lab_split):
    core = lab_split / "vm.core"
    with open(core, "r+b") as f:
        f.seek(32)                                     # e_phoff
        f.write(struct.pack("<Q", (1 << 64) - 64))
    message = _refused(vmstate, lab_split)
    assert "program header table runs past the end of the file" in message


def test_truncated_core(vmstate, lab_split):
    core = lab_split / "vm.core"
    data = core.read_bytes()
    core.write_bytes(data[:len(data) // 2])
    assert "truncated core" in _refused(vmstate, lab_split)


def test_xml_of_another_image(vmstate, lab_split, example):
    other = lab_split / "other"
    other.mkdir()
    assert vmstate("run", example("sse_keeper"), cwd=other).returncode == 0
    assert vmstate("split", "vm_image.sav", cwd=other).returncode == 0
    shutil.copy(other / "hw.xml", lab_split / "hw.xml")
    assert "come from different images" in _refused(vmstate, lab_split)


def test_two_aliases_patched_differently(vmstate, lab_split):
    """A core whose direct-map segment points at its own copy of memory, which then differs
    from what the virtual segment shows (gdb cannot make this; another tool could)."""
    core = lab_split / "vm.core"
    with open(core, "r+b") as f:
        elf = ELFFile(f)
        segments = list(elf.iter_segments())
        index = next(i for i, s in enumerate(segments) if s["p_vaddr"] == DIRECT_MAP_BASE)
        direct = segments[index]
        f.seek(0, 2)
        copy_at = (f.tell() + 4095) // 4096 * 4096
        f.seek(direct["p_offset"])
        data = bytearray(f.read(direct["p_filesz"]))
        data[0x402011] ^= 0xFF                      # one byte of the "Bye" string
        f.seek(copy_at)
        f.write(data)
        header_at = elf["e_phoff"] + index * elf["e_phentsize"]
        f.seek(header_at + 8)
        f.write(copy_at.to_bytes(8, "little"))      # p_offset of the direct-map segment
    message = _refused(vmstate, lab_split)
    assert "two aliases of one page were patched differently" in message
    assert "0x402000" in message


def test_xml_failing_the_schema(vmstate, lab_split):
    edit(lab_split / "hw.xml", "<msrs>", "<msrs><unexpected/>")
    assert re.search(r"hw\.xml:\d+: .*unexpected", _refused(vmstate, lab_split))


def test_dry_run_writes_nothing(vmstate, lab_split):
    edit(lab_split / "hw.xml", '<reg name="rbx" value="0x3"/>', '<reg name="rbx" value="0x4"/>')
    result = vmstate("join", "--dry-run", "vm.core", "hw.xml")
    assert result.returncode == 0
    assert "vcpu 0 rbx: 0x3 -> 0x4" in result.stdout.decode()
    assert sorted(p.name for p in lab_split.iterdir()) == [
        "ay_caramba.txt", "hw.xml", "vm.core", "vm_image.sav"]


def test_gdb_write_into_a_never_touched_page_adds_it(vmstate, lab_split, example):
    patched = gdb_batch(example("lab_app"), lab_split / "vm.core",
                        "set var *(long *)0x3000000 = 0x1234", write=True)
    assert patched.returncode == 0, patched.stderr
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "new.sav")
    assert joined.returncode == 0, joined.stderr
    assert "memory page 0x3000000 added (virtual 0x3000000" in joined.stdout.decode()
    info = vmstate("info", "--json", "new.sav")
    before = vmstate("info", "--json", "vm_image.sav")
    import json
    assert json.loads(info.stdout)["memory"][0]["present_pages"] == \
        json.loads(before.stdout)["memory"][0]["present_pages"] + 1
    assert vmstate("restore", "new.sav").returncode == 0


@pytest.mark.parametrize("args", [
    ("split", "vm_image.sav", "--core", "vm_image.sav"),
    ("split", "vm_image.sav", "--xml", "alias.sav"),          # a hard link to the image
    ("split", "vm_image.sav", "--core", "same.out", "--xml", "same.out"),
    ("join", "vm.core", "hw.xml", "-o", "vm.core"),
    ("join", "vm.core", "hw.xml", "-o", "link.xml"),          # a symlink to the XML
])
def test_an_output_never_replaces_an_input(vmstate, lab_split, args):
    os.link(lab_split / "vm_image.sav", lab_split / "alias.sav")
    os.symlink("hw.xml", lab_split / "link.xml")
    before = {p.name: p.read_bytes() for p in lab_split.iterdir() if p.is_file()}
    result = vmstate(*args)
    assert result.returncode == 2
    assert "is the same file as" in one_line_error(result)
    assert {p.name: p.read_bytes() for p in lab_split.iterdir() if p.is_file()} == before


def test_run_never_saves_over_its_program(vmstate, example, tmp_path):
    program = tmp_path / "lab_app"
    shutil.copy(example("lab_app"), program)
    result = vmstate("run", "--image", program, program)
    assert result.returncode == 2
    assert "--image" in one_line_error(result)
    assert program.read_bytes() == Path(example("lab_app")).read_bytes()


def test_split_then_join_of_another_split_pair_is_detected_by_digest(vmstate, lab_split,
                                                                      example):
    """split commits the core, then the XML: a kill between them leaves a new core beside
    an old XML. join tells them apart by the image digest both carry."""
    assert vmstate("run", example("sse_keeper")).returncode == 0   # a new vm_image.sav
    kept_xml = (lab_split / "hw.xml").read_bytes()
    assert vmstate("split", "vm_image.sav").returncode == 0
    (lab_split / "hw.xml").write_bytes(kept_xml)               # as if killed before the XML
    assert "come from different images" in _refused(vmstate, lab_split)
