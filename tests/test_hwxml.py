"""The XML hardware state: lossless round trips (Hypothesis), every XML file in the repository
valid against the schema (as libvirt's virschematest), edits taking effect, hostile input
refused, and every problem reported as FILE:LINE."""

import base64
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from strategies import sample_state, vm_states
from vmstate import xsave
from vmstate.errors import FormatError
from vmstate.hwxml import (
    SCHEMA_VERSION, HardwareDocument, Provenance, XmlError, from_xml, schema, to_xml)
from vmstate.state import GuestOs, OpenFile

REPO = Path(__file__).resolve().parent.parent
INVALID_CORPUS = REPO / "tests" / "data" / "hwxml-invalid"     # test_hwxml_corpus.py
REPOSITORY_XML = sorted(path for pattern in ("examples/**/*.xml", "schemas/**/*.xml",
                                             "tests/**/*.xml")
                        for path in REPO.glob(pattern) if INVALID_CORPUS not in path.parents)
SAMPLE_XML = REPO / "examples" / "sample-hw.xml"
SOURCE = "hw.xml"
any_text = st.text(max_size=12)     # includes characters XML 1.0 cannot carry


@st.composite
def documents(draw) -> HardwareDocument:
    state, _ = draw(vm_states())
    digests = tuple(draw(st.just(b"") | st.binary(min_size=8 * region.present_pages,
                                                  max_size=8 * region.present_pages))
                    for region in state.memory)
    provenance = Provenance(draw(st.integers(0, 2**64 - 1)), draw(any_text), draw(any_text),
                            digests)
    return HardwareDocument(state, provenance)


def sample_document() -> HardwareDocument:
    state, _ = sample_state()
    return HardwareDocument(state, Provenance(0x0123456789ABCDEF, "saved/app.sav", "app.core",
                                              (bytes(range(8)) * state.memory[0].present_pages,)))


def sample_xml() -> str:
    document = sample_document()
    return to_xml(document.state, document.provenance).decode()


def _line_of(text: str, needle: str) -> int:
    assert needle in text, needle
    return text[:text.index(needle)].count("\n") + 1


def _edited(text: str, old: str, new: str) -> tuple[bytes, int]:
    """`text` with the first `old` replaced by `new`, and the line where that happened."""
    return text.replace(old, new, 1).encode(), _line_of(text, old)


def _error(data: bytes) -> str:
    with pytest.raises(XmlError) as caught:
        from_xml(data, SOURCE)
    return str(caught.value)


def _assert_error(data: bytes, line: int, pattern: str) -> None:
    message = _error(data)
    assert message.startswith(f"{SOURCE}:{line}: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


# --- Round trips -----------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(document=documents())
def test_round_trip_is_lossless_and_byte_stable(document):
    data = to_xml(document.state, document.provenance)
    assert data == to_xml(document.state, document.provenance)
    back = from_xml(data, SOURCE)
    assert back == document
    assert to_xml(back.state, back.provenance) == data


def test_sample_state_round_trips():
    document = sample_document()
    assert from_xml(to_xml(document.state, document.provenance), SOURCE) == document


def test_output_is_readable_utf8_with_declaration():
    text = sample_xml()
    assert text.startswith("<?xml version='1.0' encoding='UTF-8'?>\n<vmstate-hardware "
                           f'version="{SCHEMA_VERSION}">')
    assert '<reg name="rip" value="0x401000"/>' in text
    assert '<msr index="0xc0000082" name="LSTAR" value="0x4800"/>' in text
    assert '<fd number="3" kind="file" path="dir/data.txt" flags="0x42" mode="0644" ' \
           'offset="17"/>' in text
    assert '<fd number="0" kind="stdin" flags="0x2"/>' in text
    assert re.search(r'<xmm index="0" value="0x[0-9a-f]{32}"/>', text)
    assert max(len(line.strip()) for line in text.splitlines()
               if re.fullmatch(r"\s*[A-Za-z0-9+/=]+", line)) == 76


@pytest.mark.parametrize("value", ["\x01", "a\x1fb", "\ufffe", "\uffff", "\udcff\udc80",
                                   "\x7f\x00"])
def test_strings_xml_cannot_carry_are_base64_and_round_trip(value):
    document = sample_document()
    vmm = replace(document.state.vmm, program=value, argv=(value, "plain"),
                  files=(OpenFile(3, "file", value, 0, 0o600, 0),))
    state = replace(document.state, vmm=vmm)
    provenance = replace(document.provenance, image_file=value, core_file=value)
    text = to_xml(state, provenance).decode()
    for attribute in ("path-base64", "value-base64", "image-file-base64", "core-file-base64"):
        assert f'{attribute}="' in text
    assert '<arg value="plain"/>' in text
    assert from_xml(text.encode(), SOURCE) == HardwareDocument(state, provenance)


def test_whitespace_and_markup_characters_stay_plain_text():
    value = " \t<&\"'>\r\n "
    document = sample_document()
    state = replace(document.state, vmm=replace(document.state.vmm, program=value))
    text = to_xml(state, document.provenance).decode()
    assert "path-base64" not in text
    assert from_xml(text.encode(), SOURCE).state.vmm.program == value


@pytest.mark.parametrize("size", [0, 1, 5, 100, 511, 512, 576, 4096])
def test_xsave_of_any_size_round_trips(size):
    area = bytes((i * 7 + 1) & 0xFF for i in range(size))
    document = sample_document()
    vcpu = replace(document.state.vcpus[0], xsave=area)
    state = replace(document.state, vcpus=(vcpu,))
    text = to_xml(state, document.provenance).decode()
    assert ("<fpu " in text) == (size > 0) and ("<xsave-rest " in text) == (size > 0)
    assert from_xml(text.encode(), SOURCE).state.vcpus[0].xsave == area


def test_xsave_rest_does_not_repeat_the_decoded_fields():
    area = bytes(range(256)) * 16
    document = sample_document()
    state = replace(document.state, vcpus=(replace(document.state.vcpus[0], xsave=area),))
    root = etree.fromstring(to_xml(state, document.provenance))
    rest = base64.b64decode("".join(root.find("vcpu/xsave-rest").text.split()))
    assert len(rest) == len(area) and rest[512:] == area[512:]
    decoded = xsave.decode(rest)
    assert not any(getattr(decoded, name) for name in xsave.CONTROL_FIELDS)
    assert not any(b"".join(decoded.st + decoded.xmm))


# --- Schema ----------------------------------------------------------------------------------

def test_schema_is_cached_and_the_sample_is_in_the_repository_list():
    assert schema() is schema()
    assert SAMPLE_XML in REPOSITORY_XML


@pytest.mark.parametrize("path", REPOSITORY_XML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_xml_file_in_the_repository_is_valid(path):
    tree = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True))
    assert schema().validate(tree), schema().error_log
    if tree.getroot().tag == "vmstate-hardware":
        from_xml(path.read_bytes(), str(path))


def test_sample_file_describes_what_the_brief_promises():
    document = from_xml(SAMPLE_XML.read_bytes(), str(SAMPLE_XML))
    assert len(document.state.vcpus) == 1
    assert {entry.kind for entry in document.state.vmm.files} >= {"file"}
    assert len(document.state.vmm.files) == 2


# --- Edits take effect -----------------------------------------------------------------------

def test_edited_registers_msrs_fpu_and_files_are_read_back():
    text = sample_xml()
    for old, new in (('name="rip" value="0x401000"', 'name="rip" value="0x401A2C"'),
                     ('name="LSTAR" value="0x4800"', 'name="LSTAR" value="0xffffffff81000000"'),
                     ('mode="0644"', 'mode="0600"'),
                     ('path="dir/data.txt"', 'path="other.txt"')):
        text = text.replace(old, new, 1)
    text = re.sub(r'<xmm index="0" value="0x[0-9a-f]+"', '<xmm index="0" value="0x3ff0"', text)
    state = from_xml(text.encode(), SOURCE).state
    vcpu = state.vcpus[0]
    assert vcpu.regs.rip == 0x401A2C
    assert vcpu.msr(0xC0000082) == 0xFFFFFFFF81000000
    assert xsave.decode(vcpu.xsave).xmm[0] == (0x3FF0).to_bytes(16, "little")
    assert state.vmm.files[1].mode == 0o600 and state.vmm.files[1].path == "other.txt"


def test_msr_name_is_informational_and_may_be_omitted():
    text = sample_xml().replace(' name="LSTAR"', ' name="whatever"').replace(' name="STAR"', "")
    assert from_xml(text.encode(), SOURCE) == sample_document()


def test_standard_stream_may_omit_path_mode_offset_but_a_file_may_not():
    text = sample_xml()
    document = from_xml(text.replace('<fd number="0" kind="stdin" flags="0x2"/>',
                                     '<fd number="0" kind="stdin" flags="0x2" path="tty" '
                                     'mode="0600" offset="5"/>').encode(), SOURCE)
    assert document.state.vmm.files[0] == OpenFile(0, "stdin", "tty", 2, 0o600, 5)
    for attribute in ('path="dir/data.txt" ', 'mode="0644" ', 'offset="17"'):
        data, line = _edited(text, attribute, "")
        _assert_error(data, line, "does not match the schema")


def test_pending_call_is_optional():
    document = sample_document()
    state = replace(document.state, vmm=replace(document.state.vmm, pending=None))
    text = to_xml(state, document.provenance).decode()
    assert "<pending-call" not in text
    assert from_xml(text.encode(), SOURCE).state.vmm.pending is None


# --- Errors, each with FILE:LINE -------------------------------------------------------------

@pytest.mark.parametrize("old, new, pattern", [
    ('selector="0x0"', 'selector="0x10000"', r"selector='0x10000' does not fit in 16 bits"),
    ('name="rax" value="0x1"', 'name="rax" value="0x10000000000000000"', "64 bits"),
    ('present="0"', 'present="256"', "present='256' does not fit in 8 bits"),
    ('<mp-state value="0"', '<mp-state value="' + "9" * 5000 + '"', "32 bits"),
    ('<vcpu id="0">', '<vcpu id="0" extra="1">', "does not match the schema"),
    ('name="rax" value="0x1"', 'name="rax" value="1"', "does not match the schema"),
    ('name="rbx"', 'name="rbz"', "does not match the schema"),
    ('mode="0644"', 'mode="644"', "does not match the schema"),
    ('mode="0644"', 'mode="0648"', "does not match the schema"),
    ('<st index="3"', '<st index="2"', r'<st index="2"> is out of range or repeated'),
    ('<xmm index="15"', '<xmm index="16"', r"out of range or repeated \(expected xmm 0 to 15"),
    ('<region index="0"', '<region index="1"', "region index 1 is out of order"),
    ('xsave-rest size="1024"', 'xsave-rest size="1025"', "holds 1024 bytes, size says 1025"),
    ('"base64">\n    ZnJvbSBhIG5ld2VyIHZtc3RhdGU=', '"base64">ZnJvbSBhIG5ld2VyIHZtc3RhdGU',
     "does not match the schema: Type base64Binary doesn't allow value 'ZnJvbSBh"),
    ('"base64">\n    ZnJvbSBhIG5ld2VyIHZtc3RhdGU=', '"base64">@@@@ZnJvbSBhIG5ld2VyIHZtc3RhdGU=',
     "bad base64 in <extra-section>: Only base64 data is allowed"),
    ('"base64">\n    ZnJvbSBhIG5ld2VyIHZtc3RhdGU=', '"base64">ZnJvbSBh*G5ld2VyIHZtc3RhdGU=',
     "does not match the schema: .*extra-section failed to validate content"),
])
def test_bad_values_are_reported_at_their_line(old, new, pattern):
    data, line = _edited(sample_xml(), old, new)
    _assert_error(data, line, pattern)


def test_altstack_flags_must_fit_the_32_bits_of_ss_flags():
    """Found at join as FILE:LINE (the image's field is a u32: encoding would fail later)."""
    document = sample_document()
    state = replace(document.state, vmm=replace(document.state.vmm, os=GuestOs(altstack=(0, 2, 0))))
    text = to_xml(state, document.provenance).decode()
    data, line = _edited(text, 'altstack-flags="0x2"', 'altstack-flags="0x200000000"')
    _assert_error(data, line, "altstack-flags='0x200000000' does not fit in 32 bits")


def test_upper_case_hex_is_accepted():
    text = sample_xml().replace('value="0x401000"', 'value="0X401ABC"', 1)
    assert from_xml(text.encode(), SOURCE).state.vcpus[0].regs.rip == 0x401ABC


def test_missing_st_register_is_reported():
    text = sample_xml()
    edited = re.sub(r'\s*<st index="7"[^>]*/>', "", text)
    _assert_error(edited.encode(), _line_of(text, "<fpu "), r"<fpu> lacks <st> index \[7\]")


def test_fpu_values_beyond_a_short_xsave_area_are_refused():
    document = sample_document()
    vcpu = replace(document.state.vcpus[0], xsave=bytes(100))
    text = to_xml(replace(document.state, vcpus=(vcpu,)), document.provenance).decode()
    data, _ = _edited(text, '<xmm index="15" value="0x0', '<xmm index="15" value="0x1')
    _assert_error(data, _line_of(text, "<fpu "), "<fpu> sets bytes beyond the 100-byte XSAVE area")


def test_present_pages_must_be_a_bitmap_of_the_region():
    text = sample_xml()
    bitmap = re.search(r"<present-pages[^>]*>([^<]*)</present-pages>", text)
    _assert_error(text.replace(bitmap.group(1), "AAAAAAAAAAA=").encode(),
                  _line_of(text, "<present-pages"),
                  r"<present-pages> holds 8 bytes, expected \d+ \(one bit for each of the "
                  r"region's \d+ pages\)")


def test_page_digests_must_cover_every_present_page_or_none():
    text = sample_xml()
    digests = re.search(r"<page-digests[^>]*>([^<]*)</page-digests>", text)
    _assert_error(text.replace(digests.group(1), "AAAAAAAAAAA=").encode(),
                  _line_of(text, "<page-digests"),
                  r"<page-digests> holds 8 bytes, expected 8 per present page \(21 pages\)")
    emptied = text.replace(digests.group(0), '<page-digests algorithm="xxh3-64" '
                                             'encoding="base64"/>')
    assert from_xml(emptied.encode(), SOURCE).provenance.page_digests == (b"",)


def test_duplicate_vcpu_ids_and_fd_numbers_are_refused():
    document = sample_document()
    two = replace(document.state, vcpus=document.state.vcpus * 2)
    text = to_xml(two, document.provenance).decode()
    second = text.index('<vcpu id="0">', text.index('<vcpu id="0">') + 1)
    _assert_error(text.encode(), text[:second].count("\n") + 1, r'duplicate <vcpu id="0">')
    data, line = _edited(sample_xml(), '<fd number="3"', '<fd number="0"')
    _assert_error(data, line, r'duplicate <fd number="0">')


def test_malformed_xml_is_reported_at_its_line():
    data, line = _edited(sample_xml(), "</registers>", "</register>")
    _assert_error(data, line, "not well-formed XML: .*mismatch")
    _assert_error(b"", 1, "not well-formed XML")


def test_wrong_root_and_missing_parts_fail_the_schema():
    _assert_error(b"<?xml version='1.0'?>\n<domain/>", 2, "does not match the schema")
    text = sample_xml()
    without_memory = re.sub(r"<memory>.*?</memory>", "", text, flags=re.DOTALL)
    _assert_error(without_memory.encode(), _line_of(without_memory, "<vmm>"),
                  "does not match the schema: Did not expect element vmm there")


def test_other_major_versions_are_refused_by_name():
    data, line = _edited(sample_xml(), 'version="2.0"', 'version="3.0"')
    _assert_error(data, line, r"format version 3\.0 is newer than this vmstate reads \(2\.0\)")
    data, line = _edited(sample_xml(), 'version="2.0"', 'version="1.0"')
    _assert_error(data, line, r"format version 1\.0 is older than this vmstate reads \(2\.0\); "
                              "split the image again")
    data, line = _edited(sample_xml(), 'version="2.0"', 'version="2.7"')
    assert from_xml(data, SOURCE) == sample_document()


@pytest.mark.parametrize("old, new", [
    ('image-file="saved/app.sav"', 'image-file="&xxe;"'),
    ('<mp-state value="0"/>', '<mp-state value="0"/>&xxe;'),
])
def test_external_entities_are_not_read(old, new):
    data = (b"<?xml version='1.0'?>\n<!DOCTYPE vmstate-hardware [\n"
            b'  <!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>\n'
            + sample_xml().split("\n", 1)[1].replace(old, new).encode())
    message = _error(data)
    assert re.match(rf"{SOURCE}:\d+: ", message)
    assert "root:" not in message


def test_billion_laughs_fails_fast():
    entities = "".join(f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">\n' for i in range(1, 10))
    data = (f"<?xml version='1.0'?>\n<!DOCTYPE vmstate-hardware [\n  <!ENTITY lol0 \"lol\">\n"
            f"{entities}]>\n<vmstate-hardware version=\"1.0\">&lol9;</vmstate-hardware>\n"
            ).encode()
    started = time.monotonic()
    message = _error(data)
    assert time.monotonic() - started < 10           # expanded, it would take minutes
    assert re.match(rf"{SOURCE}:\d+: ", message) and len(message) < 300


def test_doctype_without_entities_is_refused():
    data = b"<?xml version='1.0'?>\n<!DOCTYPE vmstate-hardware>\n" + \
        sample_xml().split("\n", 1)[1].encode()
    _assert_error(data, 1, "a DOCTYPE is not allowed")


def test_xml_error_is_a_format_error():
    assert issubclass(XmlError, FormatError)
