"""The hardware state of an image as an XML document (split writes it, join reads it back).

schemas/hardware-state.rng is the normative definition and schemas/hardware-state.md the
description. The document carries a VmState losslessly, except guest memory, whose bytes live
in the ELF core: `from_xml(to_xml(state, provenance))` gives back the same state and provenance.

    <vmstate-hardware version="2.0">
      <provenance image-digest="0x..." image-file="..." core-file="..."/>
      <vcpu id="0"> registers, segments, descriptor tables, control, msrs, fpu + xsave-rest,
                    xcrs, events, mp-state, debug-registers, cpuid </vcpu>      (one per vCPU)
      <memory> <region ...> present-pages bitmap, page-digests </region> </memory>
      <vmm> program + args, files, address-space, pending-call, os </vmm>
      <extra-section .../>                                                     (zero or more)
    </vmstate-hardware>

Input is untrusted: no DTD, no entities, no network, then RelaxNG validation, then range
checks; every problem is an XmlError "FILE:LINE: what is wrong".
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import os
import re
from pathlib import Path

from lxml import etree

from vmstate import xsave
from vmstate.record import record
from vmstate.errors import FormatError, shorten
from vmstate.pages import PageSet
from vmstate.state import (
    CONTROL_REGISTERS, GP_REGISTERS, SEGMENT_REGISTERS, VCPU_EVENT_FIELDS, AddressSpace,
    PAGE_SIZE, CpuidEntry, DebugRegisters, Descriptor, DescriptorTable, ExtraSection, GuestLimits,
    GuestOs, MemoryRegion, OpenFile, PendingCall, Pipe, Registers, Segment, SignalAction,
    SpecialRegisters, VcpuEvents, VcpuState, VmmState, VmState)
from vmstate.x86 import msr_name

SCHEMA_VERSION = "2.0"
SCHEMA_MAJOR = 2
SCHEMA_FILE = "hardware-state.rng"
ROOT = "vmstate-hardware"
BASE64_LINE = 76
INDENT = "  "
SCHEMA_MESSAGES = 3         # libxml2's first messages about one problem; later ones repeat it


@record
class Provenance:
    """What split read and wrote, for join to check and people to read; not state to edit."""
    image_digest: int                   # XXH3-64 of the source image's metadata
    image_file: str                     # the image's path as given to split
    core_file: str                      # the core's file name written by split
    page_digests: tuple[bytes, ...]     # per region: 8-byte LE XXH3-64 of each present page


@record
class HardwareDocument:
    state: VmState
    provenance: Provenance


class XmlError(FormatError):
    """A hardware document that is not well-formed, not valid, or holds impossible values."""


class _Invalid(Exception):
    """A problem found while converting an element; from_xml adds the file name."""

    def __init__(self, element, message: str):
        super().__init__(message)
        self.line = element.sourceline


# --- How each integer field is spelled -------------------------------------------------------

@record
class Number:
    """The base an integer field is written in, and how many bits it may hold."""
    base: int
    bits: int
    digits: int = 1     # hex digits written at least, for fixed-size registers

    def format(self, value: int) -> str:
        if self.base == 16:
            return f"0x{value:0{self.digits}x}"
        if self.base == 8:
            return f"0{value:o}"
        return str(value)

    def parse(self, element, attribute: str) -> int:
        text = element.get(attribute)
        try:
            value = int(text, self.base)
        except ValueError:      # only a decimal too long for int() gets past the schema
            value = -1
        if not 0 <= value < 1 << self.bits:
            raise _Invalid(element, f"<{element.tag}> {attribute}={shorten(text)!r} does not "
                                    f"fit in {self.bits} bits")
        return value


HEX8, HEX16, HEX32, HEX64 = (Number(16, bits) for bits in (8, 16, 32, 64))
DEC8, DEC31, DEC32, DEC64 = (Number(10, bits) for bits in (8, 31, 32, 64))
OCT32 = Number(8, 32)
ST_VALUE = Number(16, 80, digits=20)
XMM_VALUE = Number(16, 128, digits=32)

# Field tables: dataclass field -> spelling; the attribute is the field name in kebab-case.
SEGMENT_FIELDS = {"selector": HEX16, "base": HEX64, "limit": HEX32, "type": HEX8,
                  **dict.fromkeys(("present", "dpl", "db", "s", "l", "g", "avl", "unusable"),
                                  DEC8)}
DTABLE_FIELDS = {"base": HEX64, "limit": HEX16}
INTERRUPT_BITMAP_WORDS = ("word0", "word1", "word2", "word3")
FPU_FIELDS = {"fcw": HEX16, "fsw": HEX16, "ftw": HEX8, "fop": HEX16, "fip": HEX64,
              "fdp": HEX64, "mxcsr": HEX32, "mxcsr_mask": HEX32}
EVENT_FIELDS = {name: HEX32 if name in ("exception_error_code", "sipi_vector", "flags")
                else HEX64 if name == "exception_payload" else DEC8
                for name in VCPU_EVENT_FIELDS}
DEBUG_FIELDS = dict.fromkeys(DebugRegisters.__dataclass_fields__, HEX64)
CPUID_FIELDS = dict.fromkeys(CpuidEntry.__dataclass_fields__, HEX32)
REGION_FIELDS = {"guest_phys_addr": HEX64, "size": HEX64}
ADDRESS_SPACE_FIELDS = dict.fromkeys(
    ("user_start", "brk_start", "brk", "mmap_low", "mmap_top", "user_end"), HEX64)
PENDING_CALL_FIELDS = {"nr": DEC64, "rip": HEX64}
EXTRA_FIELDS = {"type": HEX16, "instance": DEC32, "flags": HEX16}
FD_POSITION_FIELDS = {"mode": OCT32, "offset": DEC64}
OS_FIELDS = {"uid": DEC32, "gid": DEC32, "blocked": HEX64, "pending": HEX64, "alarm_ns": DEC64,
             "alarm_interval_ns": DEC64}
ALTSTACK_ATTRIBUTES = (("altstack-sp", HEX64), ("altstack-flags", HEX32),   # ss_flags is a u32
                       ("altstack-size", HEX64))
SIGNAL_ACTION_FIELDS = {"signal": DEC32, "handler": HEX64, "flags": HEX64, "restorer": HEX64,
                        "mask": HEX64}
LIMIT_FIELDS = {"max_fds": DEC32, "max_processes": DEC32}
DIGEST_SIZE = 8


def _fpu_bytes(fpu: xsave.FpuState) -> int:
    """The legacy region holding only `fpu`'s fields (zero elsewhere), as a little-endian int."""
    return int.from_bytes(xsave.encode(fpu, b""), "little")


# Which bytes of an XSAVE area <fpu> holds; <xsave-rest> has them zeroed. (A mask rather than
# xsave.encode over the area, because encode also zeroes the reserved byte after ftw.)
FPU_BYTES = _fpu_bytes(xsave.FpuState(
    **{name: (1 << number.bits) - 1 for name, number in FPU_FIELDS.items()},
    st=(b"\xff" * (ST_VALUE.bits // 8),) * xsave.ST_COUNT,
    xmm=(b"\xff" * (XMM_VALUE.bits // 8),) * xsave.XMM_COUNT))

# Characters outside XML 1.0's Char production cannot be carried as text (the production's
# complement, spelled as the few ranges it excludes: the negated class compiles 10x slower).
NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _attribute(name: str) -> str:
    return name.replace("_", "-")


def _field(name: str) -> str:
    return name.replace("-", "_")


def _set_numbers(element, source, fields: dict[str, Number]) -> None:
    for name, number in fields.items():
        element.set(_attribute(name), number.format(getattr(source, name)))


def _get_numbers(element, fields: dict[str, Number]) -> dict[str, int]:
    return {name: number.parse(element, _attribute(name)) for name, number in fields.items()}


def _child(parent, tag: str, **attributes: str):
    return etree.SubElement(parent, tag, attributes)


# --- Strings and binary data -----------------------------------------------------------------

def _set_string(element, name: str, value: str) -> None:
    """`name="value"`, or `name-base64=".."` (its file-system bytes) if XML cannot hold it."""
    if NOT_XML_CHAR.search(value):
        element.set(f"{name}-base64", base64.b64encode(os.fsencode(value)).decode())
    else:
        element.set(name, value)


def _get_string(element, name: str) -> str:
    """The string set by _set_string; "" if neither spelling is there."""
    text = element.get(name)
    encoded = element.get(f"{name}-base64")
    if text is None and encoded is not None:
        return os.fsdecode(_decode_base64(element, encoded))
    return text or ""


def _set_base64(element, data: bytes) -> None:
    element.set("encoding", "base64")
    element.text = base64.b64encode(data).decode() or None


def _get_base64(element) -> bytes:
    return _decode_base64(element, element.text or "")


def _decode_base64(element, text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as e:
        raise _Invalid(element, f"bad base64 in <{element.tag}>: {e}") from None


def _wrap_base64(root) -> None:
    """Break base64 element text into indented lines of BASE64_LINE characters."""
    for element in root.iter():
        if element.get("encoding") == "base64" and element.text:
            text = element.text
            depth = sum(1 for _ in element.iterancestors())
            inner = "\n" + INDENT * (depth + 1)
            element.text = "".join(inner + text[start:start + BASE64_LINE]
                                   for start in range(0, len(text), BASE64_LINE)
                                   ) + "\n" + INDENT * depth


# --- Writing ---------------------------------------------------------------------------------

def to_xml(state: VmState, provenance: Provenance) -> bytes:
    """The hardware document for `state`: UTF-8, indented, the same bytes for the same input."""
    root = etree.Element(ROOT, version=SCHEMA_VERSION)
    _write_provenance(root, provenance)
    for vcpu in state.vcpus:
        _write_vcpu(root, vcpu)
    _write_memory(root, state.memory, provenance.page_digests)
    _write_vmm(root, state.vmm)
    for section in state.extra:
        element = _child(root, "extra-section")
        _set_numbers(element, section, EXTRA_FIELDS)
        _set_base64(element, section.data)
    etree.indent(root, INDENT)
    _wrap_base64(root)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _write_provenance(root, provenance: Provenance) -> None:
    element = _child(root, "provenance", **{"image-digest": HEX64.format(provenance.image_digest)})
    _set_string(element, "image-file", provenance.image_file)
    _set_string(element, "core-file", provenance.core_file)


def _write_vcpu(root, vcpu: VcpuState) -> None:
    element = _child(root, "vcpu", id=str(vcpu.id))
    registers = _child(element, "registers")
    for name in GP_REGISTERS:
        _child(registers, "reg", name=name, value=HEX64.format(getattr(vcpu.regs, name)))
    _write_sregs(element, vcpu.sregs)
    msrs = _child(element, "msrs")
    for index, value in vcpu.msrs:
        _child(msrs, "msr", index=HEX32.format(index), name=msr_name(index),
               value=HEX64.format(value))
    _write_xsave(element, vcpu.xsave)
    xcrs = _child(element, "xcrs")
    for index, value in vcpu.xcrs:
        _child(xcrs, "xcr", index=DEC32.format(index), value=HEX64.format(value))
    _set_numbers(_child(element, "events"), vcpu.events, EVENT_FIELDS)
    _child(element, "mp-state", value=DEC32.format(vcpu.mp_state))
    _set_numbers(_child(element, "debug-registers"), vcpu.debugregs, DEBUG_FIELDS)
    cpuid = _child(element, "cpuid")
    for entry in vcpu.cpuid:
        _set_numbers(_child(cpuid, "leaf"), entry, CPUID_FIELDS)


def _write_sregs(vcpu_element, sregs: SpecialRegisters) -> None:
    segments = _child(vcpu_element, "segments")
    for name in SEGMENT_REGISTERS:
        _set_numbers(_child(segments, "segment", name=name), getattr(sregs, name), SEGMENT_FIELDS)
    for name in ("gdt", "idt"):
        _set_numbers(_child(vcpu_element, "descriptor-table", name=name), getattr(sregs, name),
                     DTABLE_FIELDS)
    control = _child(vcpu_element, "control")
    for name in CONTROL_REGISTERS:
        _child(control, "reg", name=_attribute(name), value=HEX64.format(getattr(sregs, name)))
    _child(control, "interrupt-bitmap", **{
        word: HEX64.format(value)
        for word, value in zip(INTERRUPT_BITMAP_WORDS, sregs.interrupt_bitmap, strict=True)})


def _write_xsave(vcpu_element, area: bytes) -> None:
    """<fpu> with the decoded legacy region, then the whole area with those fields zeroed.
    An empty area (no XSAVE state) writes neither."""
    if not area:
        return
    fpu = xsave.decode(area)
    element = _child(vcpu_element, "fpu")
    _set_numbers(element, fpu, FPU_FIELDS)
    for tag, values, number in (("st", fpu.st, ST_VALUE), ("xmm", fpu.xmm, XMM_VALUE)):
        for index, value in enumerate(values):
            _child(element, tag, index=str(index),
                   value=number.format(int.from_bytes(value, "little")))
    rest = int.from_bytes(area, "little") & ~FPU_BYTES
    _set_base64(_child(vcpu_element, "xsave-rest", size=str(len(area))),
                rest.to_bytes(len(area), "little"))


def _write_memory(root, regions: tuple[MemoryRegion, ...],
                  page_digests: tuple[bytes, ...]) -> None:
    memory = _child(root, "memory")
    for index, (region, digests) in enumerate(zip(regions, page_digests, strict=True)):
        element = _child(memory, "region", index=str(index))
        _set_numbers(element, region, REGION_FIELDS)
        _set_base64(_child(element, "present-pages"), region.present.bits)
        _set_base64(_child(element, "page-digests", algorithm="xxh3-64"), digests)


def _write_vmm(root, vmm: VmmState) -> None:
    element = _child(root, "vmm", **({"saved-by": vmm.saved_by} if vmm.saved_by else {}))
    program = _child(element, "program")
    _set_string(program, "path", vmm.program)
    for arg in vmm.argv:
        _set_string(_child(program, "arg"), "value", arg)
    files = _child(element, "files")
    for entry in vmm.files:
        _write_fd(files, entry)
    space = _child(element, "address-space")
    _set_numbers(space, vmm.address_space, ADDRESS_SPACE_FIELDS)
    for start, length in vmm.address_space.free_ranges:
        _child(space, "free", start=HEX64.format(start), length=HEX64.format(length))
    if vmm.pending is not None:
        call = _child(element, "pending-call")
        _set_numbers(call, vmm.pending, PENDING_CALL_FIELDS)
        if vmm.sleep_left_ns is not None:
            call.set("sleep-left-ns", DEC64.format(vmm.sleep_left_ns))
        for arg in vmm.pending.args:
            _child(call, "arg", value=HEX64.format(arg))
    if vmm.os is not None:
        _write_os(element, vmm.os)
    if vmm.limits is not None:
        limits = _child(element, "limits")
        if vmm.limits.max_file_size is not None:
            limits.set("max-file-size", DEC64.format(vmm.limits.max_file_size))
        _set_numbers(limits, vmm.limits, LIMIT_FIELDS)


def _write_os(vmm_element, g: GuestOs) -> None:
    element = _child(vmm_element, "os")
    _set_string(element, "cwd", g.cwd)
    element.set("umask", OCT32.format(g.umask))
    _set_string(element, "hostname", g.hostname)
    _set_numbers(element, g, OS_FIELDS)
    for (name, number), value in zip(ALTSTACK_ATTRIBUTES, g.altstack):
        element.set(name, number.format(value))
    for d in g.descriptors:
        child = _child(element, "descriptor", fd=str(d.fd), description=str(d.description),
                       cloexec=str(int(d.cloexec)))
        if d.pipe >= 0:
            child.set("pipe", str(d.pipe))
        if d.pipe >= 0 or d.flags:
            child.set("flags", HEX32.format(d.flags))
    for pipe in g.pipes:
        _set_base64(_child(element, "pipe", id=str(pipe.id)), pipe.buffered)
    for action in g.actions:
        _set_numbers(_child(element, "signal-action"), action, SIGNAL_ACTION_FIELDS)
    for resource, soft, hard in g.limits:
        _child(element, "limit", resource=str(resource), soft=str(soft), hard=str(hard))


def _write_fd(files, entry: OpenFile) -> None:
    """A regular file always has path, mode and offset; a standard stream only when set."""
    element = _child(files, "fd", number=DEC31.format(entry.fd), kind=entry.kind)
    regular = entry.kind == "file"
    if regular or entry.path:
        _set_string(element, "path", entry.path)
    element.set("flags", HEX32.format(entry.flags))
    if regular or entry.mode or entry.offset:
        _set_numbers(element, entry, FD_POSITION_FIELDS)


# --- Reading ---------------------------------------------------------------------------------

def from_xml(data: bytes, source: str) -> HardwareDocument:
    """Parse, validate and convert a hardware document; `source` names it in messages."""
    root = parse_xml(data, source)
    try:
        _check_version(root)
        _validate(root, source)
        return _read_document(root)
    except _Invalid as e:
        raise XmlError(str(e), f"{source}:{e.line}") from None


@functools.cache
def schema() -> etree.RelaxNG:
    """The RelaxNG schema, from the installed vmstate.schemas package or the source tree
    (read from the package's folder: importlib.resources would cost every split and join
    about 1.5 ms to import)."""
    package = importlib.util.find_spec("vmstate.schemas")
    folder = (Path(package.submodule_search_locations[0]) if package is not None
              else Path(__file__).resolve().parent.parent / "schemas")
    return etree.RelaxNG(etree.fromstring((folder / SCHEMA_FILE).read_bytes()))


def parse_xml(data: bytes, source: str):
    """The root element, parsed without DTDs, entities or network; a DOCTYPE is refused."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_blank_text=True)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        first = parser.error_log[0] if parser.error_log else None
        line, message = (first.line, first.message) if first else (e.lineno, e.msg)
        raise XmlError(f"not well-formed XML: {message}", f"{source}:{line}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XmlError("a DOCTYPE is not allowed in a hardware document", f"{source}:1")
    return root


def _check_version(root) -> None:
    """Refuse a newer major version before the schema reports it as a mere mismatch."""
    version = root.get("version", "")
    major = version.partition(".")[0].lstrip("0") or "0"
    if root.tag == ROOT and major.isdigit() and (len(major) > 3 or int(major) > SCHEMA_MAJOR):
        raise _Invalid(root, f"format version {shorten(version)} is newer than this vmstate "
                             f"reads ({SCHEMA_VERSION}); use a newer vmstate")
    if root.tag == ROOT and major.isdigit() and int(major) < SCHEMA_MAJOR:
        raise _Invalid(root, f"format version {shorten(version)} is older than this vmstate "
                             f"reads ({SCHEMA_VERSION}); split the image again with this vmstate")


def _validate(root, source: str) -> None:
    validator = schema()
    if not validator.validate(root):
        errors = validator.error_log
        messages = "; ".join(dict.fromkeys(" ".join(error.message.split())     # one line
                                           for error in errors[:SCHEMA_MESSAGES]))
        raise XmlError(f"does not match the schema: {messages}", f"{source}:{errors[0].line}")


def _read_document(root) -> HardwareDocument:
    vcpus = tuple(_read_vcpu(element) for element in _unique(root.findall("vcpu"), "id", DEC32))
    regions, page_digests = _read_memory(root.find("memory"))
    extra = tuple(ExtraSection(**_get_numbers(element, EXTRA_FIELDS), data=_get_base64(element))
                  for element in root.findall("extra-section"))
    provenance_element = root.find("provenance")
    provenance = Provenance(image_digest=HEX64.parse(provenance_element, "image-digest"),
                            image_file=_get_string(provenance_element, "image-file"),
                            core_file=_get_string(provenance_element, "core-file"),
                            page_digests=page_digests)
    state = VmState(vcpus=vcpus, memory=regions, vmm=_read_vmm(root.find("vmm")), extra=extra)
    return HardwareDocument(state, provenance)


def _unique(elements: list, attribute: str, number: Number) -> list:
    """`elements`, after checking that no two have the same `attribute` value."""
    seen = set()
    for element in elements:
        value = number.parse(element, attribute)
        if value in seen:
            raise _Invalid(element, f"duplicate <{element.tag} {attribute}=\"{value}\">")
        seen.add(value)
    return elements


def _hex_values(parent, tag: str) -> dict[str, int]:
    """{field name: value} of `parent`'s <tag name=".." value=".."/> children."""
    return {_field(element.get("name")): HEX64.parse(element, "value")
            for element in parent.findall(tag)}


def _read_vcpu(element) -> VcpuState:
    return VcpuState(
        id=DEC32.parse(element, "id"),
        regs=Registers(**_hex_values(element.find("registers"), "reg")),
        sregs=_read_sregs(element),
        msrs=tuple((HEX32.parse(msr, "index"), HEX64.parse(msr, "value"))
                   for msr in element.find("msrs").findall("msr")),
        xsave=_read_xsave(element),
        xcrs=tuple((DEC32.parse(xcr, "index"), HEX64.parse(xcr, "value"))
                   for xcr in element.find("xcrs").findall("xcr")),
        events=VcpuEvents(**_get_numbers(element.find("events"), EVENT_FIELDS)),
        mp_state=DEC32.parse(element.find("mp-state"), "value"),
        debugregs=DebugRegisters(**_get_numbers(element.find("debug-registers"), DEBUG_FIELDS)),
        cpuid=tuple(CpuidEntry(**_get_numbers(leaf, CPUID_FIELDS))
                    for leaf in element.find("cpuid").findall("leaf")))


def _read_sregs(vcpu_element) -> SpecialRegisters:
    segments = {segment.get("name"): Segment(**_get_numbers(segment, SEGMENT_FIELDS))
                for segment in vcpu_element.find("segments").findall("segment")}
    tables = {table.get("name"): DescriptorTable(**_get_numbers(table, DTABLE_FIELDS))
              for table in vcpu_element.findall("descriptor-table")}
    control = vcpu_element.find("control")
    bitmap = control.find("interrupt-bitmap")
    return SpecialRegisters(
        **segments, **tables, **_hex_values(control, "reg"),
        interrupt_bitmap=tuple(HEX64.parse(bitmap, word) for word in INTERRUPT_BITMAP_WORDS))


def _read_xsave(vcpu_element) -> bytes:
    """The XSAVE area: <xsave-rest> with the <fpu> fields put back (b"" without <fpu>)."""
    fpu_element = vcpu_element.find("fpu")
    if fpu_element is None:
        return b""
    rest_element = vcpu_element.find("xsave-rest")
    size = DEC32.parse(rest_element, "size")
    rest = _get_base64(rest_element)
    if len(rest) != size:
        raise _Invalid(rest_element, f"<xsave-rest> holds {len(rest)} bytes, size says {size}")
    area = int.from_bytes(rest, "little") & ~FPU_BYTES | _fpu_bytes(_read_fpu(fpu_element))
    if area >> 8 * size:
        raise _Invalid(fpu_element, f"<fpu> sets bytes beyond the {size}-byte XSAVE area")
    return area.to_bytes(size, "little")


def _read_fpu(element) -> xsave.FpuState:
    registers = {tag: _indexed_values(element, tag, count, number)
                 for tag, count, number in (("st", xsave.ST_COUNT, ST_VALUE),
                                            ("xmm", xsave.XMM_COUNT, XMM_VALUE))}
    return xsave.FpuState(**_get_numbers(element, FPU_FIELDS), **registers)


def _indexed_values(parent, tag: str, count: int, number: Number) -> tuple[bytes, ...]:
    """The values of <tag index="0".."count-1"> children, each exactly once, as bytes."""
    values: dict[int, bytes] = {}
    for element in parent.findall(tag):
        index = DEC8.parse(element, "index")
        if index >= count or index in values:
            raise _Invalid(element, f"<{tag} index=\"{index}\"> is out of range or repeated "
                                    f"(expected {tag} 0 to {count - 1}, each once)")
        values[index] = number.parse(element, "value").to_bytes(number.bits // 8, "little")
    if len(values) != count:
        missing = sorted(set(range(count)) - set(values))
        raise _Invalid(parent, f"<{parent.tag}> lacks <{tag}> index {missing}")
    return tuple(values[index] for index in range(count))


def _read_memory(memory) -> tuple[tuple[MemoryRegion, ...], tuple[bytes, ...]]:
    regions, page_digests = [], []
    for position, element in enumerate(memory.findall("region")):
        if DEC32.parse(element, "index") != position:
            raise _Invalid(element, f"region index {element.get('index')} is out of order "
                                    f"(expected {position})")
        numbers = _get_numbers(element, REGION_FIELDS)
        present = _read_present_pages(element.find("present-pages"),
                                      numbers["size"] // PAGE_SIZE)
        region = MemoryRegion(**numbers, present=present)
        regions.append(region)
        page_digests.append(_read_page_digests(element, region))
    return tuple(regions), tuple(page_digests)


def _read_present_pages(element, pages: int):
    """The present-page bitmap (bit i of byte i // 8 = page i)."""
    bitmap = _get_base64(element)
    if len(bitmap) != (pages + 7) // 8:
        raise _Invalid(element, f"<present-pages> holds {len(bitmap)} bytes, expected "
                                f"{(pages + 7) // 8} (one bit for each of the region's {pages} "
                                "pages)")
    if pages % 8 and bitmap[-1] >> pages % 8:
        raise _Invalid(element, f"<present-pages> marks pages past the region's {pages} pages")
    return PageSet(bitmap, pages)


def _read_page_digests(region_element, region: MemoryRegion) -> bytes:
    """One digest per present page, or none at all."""
    element = region_element.find("page-digests")
    digests = b"" if element is None else _get_base64(element)
    if digests and len(digests) != DIGEST_SIZE * region.present_pages:
        raise _Invalid(element, f"<page-digests> holds {len(digests)} bytes, expected "
                                f"{DIGEST_SIZE} per present page ({region.present_pages} pages)")
    return digests


def _read_vmm(element) -> VmmState:
    program = element.find("program")
    space = element.find("address-space")
    address_space = AddressSpace(
        **_get_numbers(space, ADDRESS_SPACE_FIELDS),
        free_ranges=tuple((HEX64.parse(free, "start"), HEX64.parse(free, "length"))
                          for free in space.findall("free")))
    pending = element.find("pending-call")
    return VmmState(
        program=_get_string(program, "path"),
        argv=tuple(_get_string(arg, "value") for arg in program.findall("arg")),
        files=tuple(_read_fd(fd) for fd in
                    _unique(element.find("files").findall("fd"), "number", DEC31)),
        address_space=address_space,
        pending=None if pending is None else PendingCall(
            **_get_numbers(pending, PENDING_CALL_FIELDS),
            args=tuple(HEX64.parse(arg, "value") for arg in pending.findall("arg"))),
        os=None if element.find("os") is None else _read_os(element.find("os")),
        saved_by=element.get("saved-by", ""),
        limits=None if element.find("limits") is None else _read_limits(element.find("limits")),
        sleep_left_ns=None if pending is None or pending.get("sleep-left-ns") is None
        else DEC64.parse(pending, "sleep-left-ns"))


def _read_limits(element) -> GuestLimits:
    """A missing max-file-size is no cap."""
    size = element.get("max-file-size")
    return GuestLimits(max_file_size=None if size is None else DEC64.parse(element,
                                                                           "max-file-size"),
                       **_get_numbers(element, LIMIT_FIELDS))


def _read_os(element) -> GuestOs:
    descriptors = tuple(
        Descriptor(fd=DEC31.parse(d, "fd"), description=DEC31.parse(d, "description"),
                   cloexec=d.get("cloexec") == "1",
                   pipe=DEC31.parse(d, "pipe") if d.get("pipe") is not None else -1,
                   flags=HEX32.parse(d, "flags") if d.get("flags") is not None else 0)
        for d in _unique(element.findall("descriptor"), "fd", DEC31))
    return GuestOs(
        cwd=_get_string(element, "cwd"), umask=OCT32.parse(element, "umask"),
        hostname=_get_string(element, "hostname"), **_get_numbers(element, OS_FIELDS),
        altstack=tuple(number.parse(element, name) for name, number in ALTSTACK_ATTRIBUTES),
        descriptors=descriptors,
        pipes=tuple(Pipe(DEC31.parse(p, "id"), _get_base64(p))
                    for p in _unique(element.findall("pipe"), "id", DEC31)),
        actions=tuple(SignalAction(**_get_numbers(a, SIGNAL_ACTION_FIELDS))
                      for a in element.findall("signal-action")),
        limits=tuple((DEC32.parse(limit, "resource"), DEC64.parse(limit, "soft"),
                      DEC64.parse(limit, "hard")) for limit in element.findall("limit")))


def _read_fd(element) -> OpenFile:
    """A file table entry; a standard stream's missing path, mode and offset are "", 0, 0."""
    position = (_get_numbers(element, FD_POSITION_FIELDS) if element.get("mode") is not None
                else {})
    return OpenFile(fd=DEC31.parse(element, "number"), kind=element.get("kind"),
                    path=_get_string(element, "path"), flags=HEX32.parse(element, "flags"),
                    **position)
