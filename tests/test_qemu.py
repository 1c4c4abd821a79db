"""The QEMU loop with a real QEMU 7.2 (TCG): save a running guest, split, patch memory with
gdb, edit device fields and registers in the XML, join, resume in a new QEMU and read the
edits back from the guest's serial output; byte-identical round trips on pc and q35, idle and
with all RAM written; every refusal of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import one_line_error

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
import qemu_vm  # noqa: E402

KERNEL = REPO / "examples" / "qemu_guest" / "kernel.elf"
KERNEL64, KERNEL64_SYMBOLS = (REPO / "examples" / "qemu_guest" / name
                              for name in ("kernel64.bin", "kernel64.elf"))
MEMORY = "128M"


def _qemu_missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (make setup installs qemu-system-x86)"
    if shutil.which("gcc") is None:
        return "gcc is not installed"
    return None


@pytest.fixture(scope="session")
def kernel() -> Path:
    missing = _qemu_missing()
    if missing:
        if os.environ.get("VMSTATE_REQUIRE_KVM") == "1":
            pytest.fail(f"CI requires the QEMU tests: {missing}")
        pytest.skip(f"QEMU TESTS SKIPPED: {missing}")
    subprocess.run(["make", "-s", "-C", str(KERNEL.parent)], check=True)
    return KERNEL


@pytest.fixture(scope="session")
def saved(kernel, tmp_path_factory):
    """Streams saved from running guests, made once: saved(machine, fill=False, memory,
    bits=32 or 64 for the long-mode guest)."""
    directory = tmp_path_factory.mktemp("qemu-streams")
    cache = {}

    def get(machine: str, fill: bool = False, memory: str = MEMORY, bits: int = 32) -> Path:
        key = (machine, fill, memory, bits)
        if key not in cache:
            path = directory / f"{machine}-{'fill' if fill else 'idle'}-{memory}-{bits}.state"
            qemu_vm.save_running_guest(path, machine, memory, directory / f"{path.stem}.log",
                                       fill=fill, kernel=KERNEL64 if bits == 64 else KERNEL)
            cache[key] = path
        return cache[key]
    return get


def split(vmstate, stream: Path, where: Path):
    result = vmstate("split", stream, "--core", where / "vm.core", "--xml", where / "hw.xml")
    assert result.returncode == 0, result.stderr.decode()
    return where / "vm.core", where / "hw.xml"


def edit_xml(xml: Path, pattern: str, replacement: str) -> None:
    text = xml.read_text()
    edited, count = re.subn(pattern, replacement, text)
    assert count == 1, f"{pattern!r} matched {count} times"
    xml.write_text(edited)


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("fill", [False, True], ids=["idle", "all-ram-written"])
def test_join_of_split_is_the_stream_byte_for_byte(vmstate, saved, tmp_path, machine, fill):
    stream = saved(machine, fill)
    core, xml = split(vmstate, stream, tmp_path)
    for tool in (["readelf", "-lW"], ["eu-readelf", "-n"]):    # headers after the blocks
        shown = subprocess.run([*tool, core], capture_output=True, text=True)
        assert shown.returncode == 0 and not shown.stderr, shown.stderr
        assert ("LOAD" if tool[0] == "readelf" else "QEMU") in shown.stdout
    result = vmstate("join", core, xml, "-o", tmp_path / "new.state")
    assert result.returncode == 0, result.stderr.decode()
    assert "no changes" in result.stdout.decode()
    assert (tmp_path / "new.state").read_bytes() == stream.read_bytes()
    if fill:     # the guest wrote every page above 2 MiB: they are PAGE records, in the core
        assert stream.stat().st_size > 120 << 20


def test_a_zero_page_stored_in_two_pieces_is_one_changed_page(vmstate, saved, tmp_path,
                                                               monkeypatch):
    """On a file system with blocks smaller than a page, FIEMAP can report two stored parts
    inside one hole page that was written to: join makes that page one PAGE record, once."""
    from vmstate.qemu import join as qemu_join
    from vmstate.qemu.core import QemuCore
    from vmstate.qemu.statexml import from_xml
    core, xml = split(vmstate, saved("pc"), tmp_path)
    document = from_xml(xml.read_bytes(), str(xml))
    with QemuCore(str(core)) as opened:
        base = opened.blocks["pc.ram"].offset
    ram = document.stream.blocks.index(next(b for b in document.stream.blocks
                                            if b.name == "pc.ram"))
    run = next(r for section in document.stream.sections for r in section.runs
               if r.zero and r.block == ram and r.count > 1 and r.fill == 0)
    page = base + (run.first_page + 1) * 4096
    with open(core, "r+b") as f:                      # two stored pieces of one page
        f.seek(page)
        f.write(b"\x11" * 1024)
        f.seek(page + 3000)
        f.write(b"\x22" * 1024)
    monkeypatch.setattr(qemu_join, "data_segments", lambda fd, start, end: [
        (page, page + 1024), (page + 2048, page + 4096)])
    output = tmp_path / "new.state"
    summary = qemu_join.join_stream(str(core), str(xml), xml.read_bytes(), str(output))
    assert summary.count("changed") == 1, summary
    monkeypatch.undo()
    assert vmstate("info", output).returncode == 0
    again = tmp_path / "again"
    again.mkdir()
    core2, xml2 = split(vmstate, output, again)
    assert vmstate("join", core2, xml2, "-o", again / "new.state").returncode == 0
    assert (again / "new.state").read_bytes() == output.read_bytes()


def test_a_core_cut_short_while_joining_is_one_error_and_no_output(vmstate, saved, tmp_path,
                                                                   monkeypatch):
    """The core shrinks after join opened it (before the pages are read): the writer and
    the forked digest check each meet the end early; join names the core, writes nothing."""
    from vmstate.errors import VmstateError
    from vmstate.qemu import join as qemu_join
    core, xml = split(vmstate, saved("pc", fill=True), tmp_path)
    zero_run_changes = qemu_join._zero_run_changes

    def then_cut(*arguments):
        changes = zero_run_changes(*arguments)
        os.truncate(core, core.stat().st_size // 2)
        return changes
    monkeypatch.setattr(qemu_join, "_zero_run_changes", then_cut)
    for output in (str(tmp_path / "new.state"), None):          # writing, and --dry-run
        with pytest.raises(VmstateError, match=r"vm.core was cut short while being joined|"
                                                r"the core was cut short while being joined"):
            qemu_join.join_stream(str(core), str(xml), xml.read_bytes(), output)
        core, xml = split(vmstate, saved("pc", fill=True), tmp_path)    # whole again
    assert not (tmp_path / "new.state").exists()


def old_layout_core(core: bytes) -> bytes:
    """The core as split wrote it before the headers moved after the blocks: ELF header,
    program headers and notes first, the blocks from the next page on (every p_offset and
    the VMSTATE-QEMU note's block offsets moved with them)."""
    from vmstate import elf
    from vmstate.qemu import core as qemu_core
    fields = list(elf.EHDR.unpack_from(core, 0))
    phoff, phnum = fields[5], fields[10]
    headers = [list(elf.PHDR.unpack_from(core, phoff + i * elf.PHDR.size)) for i in range(phnum)]
    notes_at, notes_size = headers[0][2], headers[0][5]
    notes = []
    for name, kind, desc in elf.iter_notes(core[notes_at:notes_at + notes_size]):
        notes.append((name, kind, bytearray(desc)))
    blocks_start = qemu_core.BLOCKS_OFFSET
    blocks_end = phoff
    notes_size = len(b"".join(elf.note(n, k, bytes(d)) for n, k, d in notes))
    head = elf.EHDR.size + elf.PHDR.size * phnum
    new_start = -(-(head + notes_size) // 4096) * 4096
    shift = new_start - blocks_start
    for name, kind, desc in notes:
        if name == qemu_core.NOTE_NAME:
            header = qemu_core.BLOCK_NOTE_HEADER.unpack_from(desc)
            position = qemu_core.BLOCK_NOTE_HEADER.size + header[3]
            for _ in range(header[4]):
                offset, size, length = qemu_core.BLOCK_ENTRY.unpack_from(desc, position)
                qemu_core.BLOCK_ENTRY.pack_into(desc, position, offset + shift, size, length)
                position += qemu_core.BLOCK_ENTRY.size + length
    note_bytes = b"".join(elf.note(n, k, bytes(d)) for n, k, d in notes)
    headers[0][2] = head
    for h in headers[1:]:
        h[2] += shift
    fields[5] = elf.EHDR.size
    out = elf.EHDR.pack(*fields) + b"".join(elf.PHDR.pack(*h) for h in headers) + note_bytes
    return out.ljust(new_start, b"\0") + core[blocks_start:blocks_end]


def test_a_core_split_before_the_headers_moved_still_joins(vmstate, saved, tmp_path):
    stream = saved("pc")
    core, xml = split(vmstate, stream, tmp_path)
    old = tmp_path / "old.core"
    old.write_bytes(old_layout_core(core.read_bytes()))
    assert vmstate("join", old, xml, "-o", tmp_path / "new.state").returncode == 0
    assert (tmp_path / "new.state").read_bytes() == stream.read_bytes()
    readelf = subprocess.run(["readelf", "-lW", old], capture_output=True, text=True)
    assert "LOAD" in readelf.stdout and not readelf.stderr


def test_info_shows_machine_vcpu_blocks_and_devices(vmstate, saved):
    result = vmstate("info", "--json", saved("q35"))
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["file"]["machine"].startswith("pc-q35-")
    assert int(data["vcpus"][0]["control"]["cr0"], 16) & 1          # protected mode
    blocks = {block["name"]: block for block in data["memory"]}
    assert blocks["pc.ram"]["size"] == 128 << 20
    devices = {device["name"].rsplit("/", 1)[-1] for device in data["devices"]}
    assert {"cpu", "mch", "ICH9LPC", "rtl8139", "serial"} <= devices
    text = vmstate("info", saved("q35")).stdout.decode()
    assert "pc.ram: 128 MiB" in text and "rip=0x" in text


def test_a_stream_reads_into_the_shared_model(saved):
    from vmstate.formats.registry import detect
    stream = str(saved("pc"))
    chosen = detect(stream)
    assert chosen.name == "qemu-stream"
    machine = chosen.read(stream)
    assert machine.machine_type.startswith("pc-i440fx-")
    vcpu = machine.vcpus[0]
    assert vcpu.registers["rdi"] == 1 and vcpu.control["cr0"] & 1
    assert vcpu.segments["cs"].attributes["db"] == 1            # 32-bit code, flat
    ram = {block.name: block for block in machine.memory}["pc.ram"]
    assert ram.size == 128 << 20 and ram.placements == ((0, 0, 128 << 20),)
    nic = next(d for d in machine.devices if d.name.endswith("rtl8139"))
    assert dict(nic.fields)["phys"] == "525400123456"


def test_whole_loop_edits_show_in_the_resumed_guest(vmstate, saved, kernel, tmp_path):
    stream = saved("pc")
    core, xml = split(vmstate, stream, tmp_path)
    gdb = subprocess.run(["gdb", "-q", "-batch", "-nx", "-write", str(kernel), str(core),
                          "-ex", 'set var message = "patched by gdb"',
                          "-ex", "set var nic_mac[5] = 0x99", "-ex", "p message"],
                         capture_output=True, text=True, timeout=60)
    assert '"patched by gdb"' in gdb.stdout, gdb.stdout + gdb.stderr
    edit_xml(xml, r'(name="phys" type="buffer" size="6" value=")525400123456"', r'\g<1>02aabbccddee"')
    edit_xml(xml, r'<reg name="rdi" value="0x1"/>', '<reg name="rdi" value="0x64"/>')
    result = vmstate("join", core, xml, "-o", tmp_path / "new.state", "--app", kernel)
    summary = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "rtl8139.phys: 525400123456 -> 02aabbccddee" in summary
    assert "cpu.env.regs[7] (rdi): 0x1 -> 0x64" in summary
    assert re.search(r"memory page pc.ram \+0x104000 .*nic_mac", summary), summary
    assert re.search(r"memory page pc.ram \+0x100000 .*changed", summary), summary
    output = qemu_vm.resume(tmp_path / "new.state", "pc", MEMORY, tmp_path / "resumed.log",
                            seconds=0.5)
    lines = [line for line in output.splitlines() if line.startswith("tick ")]
    assert lines, output
    for line in lines:
        assert "step 100 message 'patched by gdb'" in line, line
        assert "mac 52:54:00:12:34:99 device-mac 02:aa:bb:cc:dd:ee" in line, line
    counters = [int(line.split()[1]) for line in lines]
    assert all(b - a == 100 for a, b in zip(counters, counters[1:])), counters


def test_long_mode_guest_with_paging(vmstate, saved, tmp_path):
    """A 64-bit guest running in the higher half: the core maps its page tables' virtual
    addresses, so gdb reads and patches variables by name; the resumed guest shows it."""
    stream = saved("q35", bits=64)
    core, xml = split(vmstate, stream, tmp_path)
    result = vmstate("join", core, xml, "-o", tmp_path / "same.state")
    assert (tmp_path / "same.state").read_bytes() == stream.read_bytes()
    gdb = subprocess.run(["gdb", "-q", "-batch", "-nx", "-write", str(KERNEL64_SYMBOLS), str(core),
                          "-ex", "p &message", "-ex", 'set var message = "sixty-four"',
                          "-ex", "p/x $rip"], capture_output=True, text=True, timeout=60)
    assert "0xffffffff80" in gdb.stdout and "<message>" in gdb.stdout, gdb.stdout + gdb.stderr
    rip = re.search(r'<reg name="rip" value="(0x[0-9a-f]+)"/>', xml.read_text()).group(1)
    assert f"= {rip}" in gdb.stdout
    edit_xml(xml, r'<reg name="r15" value="0x1"/>', '<reg name="r15" value="0x7"/>')
    result = vmstate("join", core, xml, "-o", tmp_path / "new.state", "--app", KERNEL64_SYMBOLS)
    summary = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "cpu.env.regs[15] (r15): 0x1 -> 0x7" in summary
    assert re.search(r"memory page pc.ram \+0x\w+ \(guest physical 0x\w+, virtual "
                     r"0xffffffff80\w+\) changed holding", summary), summary
    output = qemu_vm.resume(tmp_path / "new.state", "q35", MEMORY, tmp_path / "resumed.log",
                            seconds=0.3)
    lines = [line for line in output.splitlines() if line.startswith("tick ")]
    assert lines and all("step 7 message 'sixty-four'" in line for line in lines), output


def test_control_register_edit_recomputes_hflags(vmstate, saved, tmp_path):
    """CR0.TS set in the XML: join updates QEMU's cached hflags (TS is bit 11) and the guest,
    which uses no FPU, runs on in a new QEMU."""
    core, xml = split(vmstate, saved("pc"), tmp_path)
    edit_xml(xml, r'<reg name="cr0" value="0x11"/>', '<reg name="cr0" value="0x19"/>')
    result = vmstate("join", core, xml, "-o", tmp_path / "ts.state")
    summary = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "cpu.env.cr[0]: 0x11 -> 0x19" in summary
    old, new = re.search(r"cpu.env.hflags: (0x[0-9a-f]+) -> (0x[0-9a-f]+)", summary).groups()
    assert int(new, 16) == int(old, 16) | 1 << 11
    output = qemu_vm.resume(tmp_path / "ts.state", "pc", MEMORY, tmp_path / "ts.log",
                            seconds=0.2)
    assert "tick " in output


def test_gdb_reads_variables_and_registers_of_a_32_bit_guest(vmstate, saved, kernel, tmp_path):
    core, xml = split(vmstate, saved("q35"), tmp_path)
    rip = re.search(r'<reg name="rip" value="(0x[0-9a-f]+)"/>', xml.read_text()).group(1)
    gdb = subprocess.run(["gdb", "-q", "-batch", "-nx", str(kernel), str(core), "-ex", "p/x $eip",
                          "-ex", "p message", "-ex", "p/x nic_mac"],
                         capture_output=True, text=True, timeout=60)
    assert f"= {rip}" in gdb.stdout, gdb.stdout + gdb.stderr
    assert '"hello from the guest"' in gdb.stdout
    assert "{0x52, 0x54, 0x0, 0x12, 0x34, 0x56}" in gdb.stdout


def test_gdb_command_splits_a_stream(vmstate, saved, kernel, tmp_path):
    result = vmstate("gdb", "--app", kernel, saved("pc"), "--", "-batch", "-ex", "p message",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert '"hello from the guest"' in result.stdout.decode()
    assert (tmp_path / "vm.core").exists() and (tmp_path / "hw.xml").exists()


# -- bad input -----------------------------------------------------------------------------------

def refused(result, *words: str) -> str:
    line = one_line_error(result)
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def pc_stream(saved, tmp_path) -> bytes:
    return saved("pc").read_bytes()


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[:len(data) // 2], ["truncated"]),
    (lambda data: data[:200_000], ["description"]),
    (lambda data: b"QEMU" + data[4:], ["magic", "offset 0x0"]),
    (lambda data: data[:7] + b"\x02" + data[8:], ["version 2"]),
])
def test_bad_streams_are_refused_and_nothing_is_written(vmstate, pc_stream, tmp_path, damage,
                                                        words):
    (tmp_path / "bad.state").write_bytes(damage(pc_stream))
    refused(vmstate("split", "bad.state"), *words)
    refused(vmstate("info", "bad.state"), *words)
    assert not (tmp_path / "vm.core").exists() and not (tmp_path / "hw.xml").exists()


def test_a_full_disk_while_splitting_is_one_line_and_leaves_nothing(vmstate_cmd, pc_stream,
                                                                    tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the core's write fails part way."""
    (tmp_path / "vm.state").write_bytes(pc_stream)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))"
    result = subprocess.run([sys.executable, "-c", f"{limit}; import os, sys; "
                             f"os.execv(sys.argv[1], sys.argv[1:])", vmstate_cmd, "split",
                             "vm.state"], cwd=tmp_path, capture_output=True, timeout=120)
    line = refused(result, "cannot write", "vm.core", "too large")
    assert "Traceback" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.state"]


def test_section_footer_mismatch_is_refused(vmstate, pc_stream, tmp_path):
    data = bytearray(pc_stream)
    name = data.index(b"\x05timer")                  # the timer section: 3 fields, 24 bytes
    footer = name + 6 + 8 + 24
    assert data[footer] == 0x7E
    data[footer + 4] ^= 0x40                         # the section id in its footer
    (tmp_path / "bad.state").write_bytes(bytes(data))
    refused(vmstate("split", "bad.state"), "section 'timer'", "footer", f"offset {footer:#x}")
    assert not (tmp_path / "vm.core").exists()


@pytest.mark.parametrize("pattern, replacement, words", [
    (r'(name="phys" type="buffer" size="6" value=")525400123456"', r'\g<1>52540012345600"',
     ["phys", "7 bytes", "holds 6"]),
    (r'(<field name="scr" type="uint8" size="1" value=")0x[0-9a-f]+"', r'\g<1>0x1ff"',
     ["scr", "does not fit"]),
    (r'<reg name="rdi" value="0x1"/>', '<reg name="rdi" value="0x10000000000000000"/>',
     ["rdi", "does not fit"]),
])
def test_values_that_do_not_fit_are_refused(vmstate, saved, tmp_path, pattern, replacement,
                                            words):
    core, xml = split(vmstate, saved("pc"), tmp_path)
    edit_xml(xml, pattern, replacement)
    refused(vmstate("join", core, xml, "-o", tmp_path / "new.state"), *words)
    assert not (tmp_path / "new.state").exists()


def test_parts_of_different_vms_are_refused(vmstate, saved, tmp_path):
    pc_dir, q35_dir, small_dir, other_dir = (tmp_path / n for n in ("pc", "q35", "small", "other"))
    for directory in (pc_dir, q35_dir, small_dir, other_dir):
        directory.mkdir()
    pc_core, pc_xml = split(vmstate, saved("pc"), pc_dir)
    _, q35_xml = split(vmstate, saved("q35"), q35_dir)
    _, small_xml = split(vmstate, saved("pc", memory="64M"), small_dir)
    other_core, _ = split(vmstate, saved("pc", fill=True), other_dir)
    out = tmp_path / "new.state"
    refused(vmstate("join", pc_core, q35_xml, "-o", out), "machine type", "pc-q35")
    refused(vmstate("join", pc_core, small_xml, "-o", out), "pc.ram", "RAM size")
    refused(vmstate("join", other_core, pc_xml, "-o", out), "another stream")
    refused(vmstate("join", pc_core, pc_xml, "-o", pc_core), "same file as the core")
    assert not out.exists()
    assert pc_core.stat().st_size > 128 << 20     # not overwritten


@pytest.mark.parametrize("pattern, words", [
    (r'\s*<device kind="full" id="\d+" name="serial"[^>]*>.*?</device>', ["missing", "reset"]),
    (r'\s*<run block="pc.ram" first="0x1" count="\d+" kind="zero"/>', ["pc.ram", "in no run"]),
])
def test_sections_or_pages_left_out_are_refused(vmstate, saved, tmp_path, pattern, words):
    core, xml = split(vmstate, saved("pc"), tmp_path)
    text = xml.read_text()
    edited, count = re.subn(pattern, "", text, count=1, flags=re.S)
    assert count == 1
    xml.write_text(edited)
    refused(vmstate("join", core, xml, "-o", tmp_path / "new.state"), *words)
    assert not (tmp_path / "new.state").exists()


def test_a_page_sent_257_times_is_refused(vmstate, saved, tmp_path):
    """The count of runs per page does not wrap (a page in 257 runs counted as in one)."""
    core, xml = split(vmstate, saved("pc"), tmp_path)
    text = xml.read_text()
    run = re.search(r'\n\s*<run block="pc.ram" first="0x1" count="\d+" kind="zero"/>', text)[0]
    xml.write_text(text.replace(run, run * 257, 1))
    refused(vmstate("join", core, xml, "-o", tmp_path / "new.state"), "pc.ram",
            "in more than one run")
    assert not (tmp_path / "new.state").exists()


def test_stream_without_description_is_refused(vmstate, pc_stream, tmp_path):
    end = pc_stream.rindex(b"\x06")
    (tmp_path / "bare.state").write_bytes(pc_stream[:end])
    refused(vmstate("split", "bare.state"), "no JSON device description")
