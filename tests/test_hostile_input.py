"""Crafted inputs that fuzzing (tests/fuzz/) found ending in an internal error: each must get
one line naming what and where, a non-zero exit, and leave no output behind."""

import base64
import json
import re
import struct
from dataclasses import replace

import pytest

from helpers import one_line_error
from test_control import Client, started  # noqa: F401 - the host's fixture
from test_qemu import kernel, saved  # noqa: F401 - the QEMU streams' fixtures
from vmstate import elf
from vmstate.image.reader import Image
from vmstate.image.writer import write_image

pytestmark = pytest.mark.kvm


@pytest.fixture
def lab_image(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    return tmp_path / "vm_image.sav"


def _rewrite(image_path, path, change) -> None:
    """The image's state changed by `change(state)`, written by the project's own writer."""
    with Image(str(image_path)) as image:
        write_image(str(path), change(image.state), [image.region_view(0)], durable=False)


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_region_beyond_the_cores_direct_map_is_refused_by_split(vmstate, lab_image,
                                                                  tmp_path):
    """A region at guest physical 2^63 has no address in the core's direct map (its virtual
    address would not fit 64 bits): split said 'internal error: error: argument out of
    range' from struct."""
    _rewrite(lab_image, tmp_path / "high.sav", lambda state: replace(
        state, memory=(replace(state.memory[0], guest_phys_addr=1 << 63),)))
    before = _files(tmp_path)
    message = one_line_error(vmstate("split", "high.sav"))
    assert "high.sav: memory region 0 at guest physical 0x8000000000000000" in message
    assert "direct map" in message
    assert _files(tmp_path) == before


def _qemu_split(vmstate, saved, tmp_path):  # noqa: F811 - the fixture
    """A QEMU stream split into q.core and q.xml in tmp_path."""
    stream = saved("pc")
    result = vmstate("split", stream, "--core", "q.core", "--xml", "q.xml")
    assert result.returncode == 0, result.stderr
    return tmp_path / "q.core", tmp_path / "q.xml"


def test_a_qemu_core_whose_note_runs_past_its_segment_is_refused(
        vmstate, saved, tmp_path):  # noqa: F811 - the fixture
    """The first note's descriptor size made larger than its segment: join said 'internal
    error: ValueError: note ... runs past the end of its segment'."""
    core, xml = _qemu_split(vmstate, saved, tmp_path)
    data = bytearray(core.read_bytes())
    header = elf.EHDR.unpack_from(data)
    phoff, phnum = header[5], header[10]
    note_offset = next(offset for p_type, _, offset, *_ in (
        elf.PHDR.unpack_from(data, phoff + i * elf.PHDR.size) for i in range(phnum))
        if p_type == elf.PT_NOTE)
    namesz, descsz, kind = elf.NHDR.unpack_from(data, note_offset)
    elf.NHDR.pack_into(data, note_offset, namesz, descsz + (1 << 30), kind)
    (tmp_path / "bad.core").write_bytes(bytes(data))
    before = _files(tmp_path)
    message = one_line_error(vmstate("join", "bad.core", "q.xml", "-o", "new.state"))
    assert f"bad.core: offset {note_offset:#x}: broken note segment" in message
    assert _files(tmp_path) == before


def test_a_qemu_cpu_field_of_another_type_is_refused(
        vmstate, saved, tmp_path):  # noqa: F811 - the fixture
    """A cpu field read to derive hflags given a type that is not an integer: join said
    'internal error: KeyError: env.gdt.limit, here env.segs[0].limit'."""
    _, xml = _qemu_split(vmstate, saved, tmp_path)
    text = xml.read_text()
    limit = '<field name="limit" type="uint32" size="4" in-vcpu="yes"/>'
    assert limit in text
    xml.write_text(text.replace(limit, limit.replace("uint32", "int32x"), 1))
    before = _files(tmp_path)
    message = one_line_error(vmstate("join", "q.core", "q.xml", "-o", "new.state"))
    assert "cpu.env.segs[0].limit: type or size changed (uint32/4x1 -> int32x/4x1)" in message
    assert _files(tmp_path) == before


@pytest.mark.parametrize("line", ["vm_root = a\0b", "vm_image = a\0b", "control = a\0b",
                                  "vm_binary = a\0b", "vm_snapshot = a\0b", "vm_na\0me = x"])
def test_a_nul_character_in_the_hosts_configuration_is_refused(vmstate, example, tmp_path,
                                                               line):
    """os calls refuse a path with a NUL: host said 'internal error: ValueError: embedded null
    byte'."""
    (tmp_path / "host.conf").write_text(f"vm_binary = {example('hello')}\n{line}\n")
    message = one_line_error(vmstate("host", "--config", "host.conf"))
    assert message == ("vmstate: host.conf:2: a NUL character (no path, command or name can "
                       "hold one)")
    assert _files(tmp_path) == ["host.conf"]


BAD_REQUESTS = [
    ("migrate", {"address": "127.0.0.1:1", "connect_timeout": "abc"},
     "argument 'connect_timeout' must be a number from 0 to 1e+09"),
    ("migrate", {"address": "127.0.0.1:1", "connect_timeout": True, "live": True},
     "argument 'connect_timeout' must be a number from 0 to 1e+09"),
    ("migrate", {"address": "127.0.0.1:1", "connect_timeout": [1]},
     "argument 'connect_timeout' must be a number from 0 to 1e+09"),
    ("snapshot", {"path": "a\0b"}, "argument 'path' holds a NUL character"),
    ("save", {"path": "a\0b"}, "argument 'path' holds a NUL character"),
    ("migrate", {"address": "127.0.0.1:1\0"}, "argument 'address' holds a NUL character"),
    ("migrate", {"address": "127.0.0.1:1", "live": True, "max_downtime_ms": True},
     "argument 'max_downtime_ms' must be a number from 0 to 60000"),
]


def test_bad_control_arguments_get_an_error_and_the_host_goes_on(
        started, guest, tmp_path):  # noqa: F811 - the fixture
    """A string for connect_timeout, or a NUL in a path, raised ValueError in the host's main
    loop: the VMM ended with an internal error, and every VM with it. JSON nested too deeply
    raised RecursionError in the client's thread: a traceback, and no reply."""
    host = started("host", "--control", "vmm.sock", "-v", f"{guest('ticker')} 100000 20 0")
    client = Client(tmp_path / "vmm.sock")
    try:
        assert client.send_line(b"[" * 20_000) == {       # under MAX_LINE: parsed
            "error": {"class": "GenericError", "desc": "not a request: JSON nested too deeply"}}
        for command, arguments, desc in BAD_REQUESTS:
            assert client.execute(command, **arguments) == {
                "error": {"class": "GenericError", "desc": desc}}
        assert [vm["state"] for vm in client.ok("query-vms")] == ["running"]
        client.ok("quit")
    finally:
        client.close()
    assert host.wait(timeout=60) == 137
    assert "internal error" not in host.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["vm.core", "hw.xml"])
def test_gdb_never_splits_an_image_over_itself(vmstate, lab_image, tmp_path, name):
    """`vmstate gdb IMAGE` splits into vm.core and hw.xml: an image of either name was
    replaced by its own split."""
    image = lab_image.rename(tmp_path / name)
    data = image.read_bytes()
    message = one_line_error(vmstate("gdb", name, "--", "-batch"))
    kind = "core" if name == "vm.core" else "XML"
    assert message == (f"vmstate: the {kind} {name} is the same file as the image {name}: an "
                       "output never replaces an input or another output")
    assert image.read_bytes() == data
    assert _files(tmp_path) == ["ay_caramba.txt", name]


@pytest.mark.parametrize("edit, words", [
    (('name="serial" instance="0" version="3"', 'name="serial" instance="0"'),
     '<device name="serial"> of kind \'full\' needs instance= and version='),
    (('name="serial" instance="0"', 'name="seri\u20acl" instance="0"'),
     "<device> name='seri\u20acl' is not Latin-1 text"),
    (('<block name="pc.ram"', '<block name="pc.r\u20acm"'),
     "<block> name='pc.r\u20acm' is not Latin-1 text"),
])
def test_qemu_xml_a_stream_cannot_hold_is_refused(
        vmstate, saved, tmp_path, edit, words):  # noqa: F811 - the fixture
    """A full section without its version, or a name outside Latin-1, passed the schema and
    join failed writing the stream: 'internal error: error: argument out of range' (struct)
    and 'internal error: UnicodeEncodeError'."""
    _, xml = _qemu_split(vmstate, saved, tmp_path)
    text = xml.read_text()
    assert edit[0] in text
    xml.write_text(text.replace(edit[0], edit[1], 1))
    before = _files(tmp_path)
    message = one_line_error(vmstate("join", "q.core", "q.xml", "-o", "new.state"))
    assert message.startswith("vmstate: q.xml:") and words in message
    assert _files(tmp_path) == before


def _with_description(stream: bytes, description: bytes) -> bytes:
    """The stream with its JSON description (0x06, be32 length, JSON, at the end) replaced."""
    marker = stream.rfind(b"\x06")
    return stream[:marker + 1] + struct.pack(">I", len(description)) + description


def _edited_description(stream: bytes, edit) -> bytes:
    marker = stream.rfind(b"\x06")
    description = json.loads(stream[marker + 5:])
    edit(description)
    return json.dumps(description).encode()


@pytest.mark.parametrize("make, words", [
    (lambda stream: b"[" * 100_000, "the JSON description cannot be read: JSON nested too "
                                    "deeply"),
    (lambda stream: _edited_description(stream, lambda d: d.update(devices=[1] * 40)),
     'the JSON description cannot be read: expected {"devices": [OBJECT, ...], ...}'),
    (lambda stream: _edited_description(stream, lambda d: d["devices"][0].update(fields=5)),
     "section 'timer' (id 0): description: expected a list of objects, got 5"),
])
def test_a_qemu_stream_with_a_hostile_description_is_refused(
        vmstate, saved, tmp_path, make, words):  # noqa: F811 - the fixture
    """json and the section decoder met values of other types than they expect: 'internal
    error: RecursionError', 'AttributeError' and 'TypeError'."""
    stream = saved("pc").read_bytes()
    (tmp_path / "bad.state").write_bytes(_with_description(stream, make(stream)))
    for command in (["info"], ["split"]):
        message = one_line_error(vmstate(*command, "bad.state"))
        assert message.startswith("vmstate: bad.state: offset 0x") and words in message
    assert _files(tmp_path) == ["bad.state"]


@pytest.mark.parametrize("description, words", [
    (b"xx", "Expecting value"), (b"[" * 100_000, "JSON nested too deeply"),
    (b'{"devices": 5}', 'expected {"devices": [OBJECT, ...], ...}')])
def test_a_qemu_xml_whose_description_is_not_one_is_refused(
        vmstate, saved, tmp_path, description, words):  # noqa: F811 - the fixture
    """join parsed the XML's <description> unchecked: 'internal error: JSONDecodeError' and
    the like."""
    _, xml = _qemu_split(vmstate, saved, tmp_path)
    text = re.sub(r"<description>[^<]*</description>", "<description>"
                  + base64.b64encode(description).decode() + "</description>", xml.read_text())
    xml.write_text(text)
    before = _files(tmp_path)
    message = one_line_error(vmstate("join", "q.core", "q.xml", "-o", "new.state"))
    assert message.startswith("vmstate: q.xml: <description> cannot be read: ")
    assert words in message
    assert _files(tmp_path) == before
