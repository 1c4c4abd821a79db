"""The hardware half of a split QEMU stream as XML: vCPU registers in vmstate's vocabulary,
every device section as a tree of named, typed fields, the RAM layout, and what join needs to
rebuild the stream byte for byte. schemas/qemu-state.rng defines it, schemas/qemu-state.md
describes it.

    <qemu-state version="1.0" machine="pc-i440fx-7.2">
      <provenance stream-digest="0x..." stream-file="vm.state" core-file="vm.core"/>
      <vcpu id="0" hflags="derived"> registers, segments, descriptor tables, control </vcpu>
      <ram-blocks> <block name="pc.ram" size="0x8000000"/> ... </ram-blocks>
      <sections> <ram-section .../> and <device ...> in stream order </sections>
      <page-digests>base64: XXH3-64 of each page stored as a PAGE record</page-digests>
      <description>base64 of QEMU's JSON description</description>
    </qemu-state>

A cpu-section field shown in <vcpu> is written `in-vcpu="yes"` without a value: <vcpu> holds it.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from ..errors import shorten
from ..hwxml import XmlError, parse_xml
from . import cpu, layout
from .cpu import VcpuView
from .description import INTEGER_TYPES, SIGNED_TYPES, Group, Leaf, Nested, Subsection
from .stream import PageRun, QemuStream, RamBlock, Section

SCHEMA_FILE = "qemu-state.rng"
ROOT = "qemu-state"
VERSION = "1.0"
BASE64_LINE = 76


@dataclass(frozen=True)
class Provenance:
    stream_digest: int                 # ties the core and this document to one stream
    stream_file: str
    core_file: str
    page_digests: bytes                # XXH3-64 (packed little-endian) of each page of the
                                       # PAGE runs, in stream order: join's baseline


class _Invalid(Exception):
    def __init__(self, element, message: str):
        super().__init__(message)
        self.line = element.sourceline


# -- writing -------------------------------------------------------------------------------------

def document_tree(stream: QemuStream, provenance: Provenance, views: list[VcpuView]):
    """The document as an element tree, its <page-digests> left empty (provenance's are not
    read): `render` fills them in, so split can build the tree while it still takes them."""
    root = etree.Element(ROOT, version=VERSION, machine=stream.machine)
    root.append(etree.Comment(
        " Written by `vmstate split` from a QEMU migration stream. Edit register values in "
        "<vcpu> and device field values; `vmstate join` checks each against its field's size. "))
    etree.SubElement(root, "provenance", {"stream-digest": f"0x{provenance.stream_digest:016x}",
                                          "stream-file": provenance.stream_file,
                                          "core-file": provenance.core_file})
    for view in views:
        root.append(_vcpu_element(view))
    blocks = etree.SubElement(root, "ram-blocks")
    for block in stream.blocks:
        etree.SubElement(blocks, "block", {"name": block.name, "size": hex(block.size)})
    sections = etree.SubElement(root, "sections")
    for section in stream.sections:
        sections.append(_section_element(stream, section))
    etree.SubElement(root, "page-digests")
    etree.SubElement(root, "description").text = _base64(stream.description)
    return root


def render(root, page_digests: bytes) -> bytes:
    """The bytes of a `document_tree`, with its page digests."""
    root.find("page-digests").text = _base64(page_digests)
    etree.indent(root, "  ")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def _base64(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return "\n".join(text[i:i + BASE64_LINE] for i in range(0, len(text), BASE64_LINE))


def _vcpu_element(view: VcpuView):
    v = view.values
    element = etree.Element("vcpu", id=str(view.id),
                            hflags="derived" if view.hflags_derived else "kept")
    registers = etree.SubElement(element, "registers")
    for name in cpu.REGISTER_NAMES:
        etree.SubElement(registers, "reg", name=name, value=hex(v["registers", name, "value"]))
    segments = etree.SubElement(element, "segments")
    for name in cpu.SEGMENT_NAMES:
        attributes = {"name": name,
                      **{part: hex(v["segment", name, part]) for part in ("selector", "base",
                                                                           "limit")}}
        for key, value in cpu.split_flags(v["segment", name, "flags"]).items():
            if key != "other-flags" or value:
                attributes[key] = hex(value) if key in ("type", "other-flags") else str(value)
        etree.SubElement(segments, "segment", attributes)
    for name in cpu.TABLE_NAMES:
        etree.SubElement(element, "descriptor-table", name=name,
                         base=hex(v["table", name, "base"]), limit=hex(v["table", name, "limit"]))
    control = etree.SubElement(element, "control")
    for name in cpu.CONTROL_NAMES:
        etree.SubElement(control, "reg", name=name, value=hex(v["control", name, "value"]))
    return element


def _section_element(stream: QemuStream, section: Section):
    attributes = {"kind": layout.SECTION_KIND_NAMES[section.kind], "id": str(section.section_id),
                  "name": section.name}
    if section.kind in layout.NAMED_SECTIONS:
        attributes.update(instance=str(section.instance), version=str(section.version))
    if section.device is None:
        element = etree.Element("ram-section", attributes)
        if section.mem_size:
            element.set("block-list", "yes")
        for run in section.runs:
            run_attributes = {"block": stream.blocks[run.block].name, "first": hex(run.first_page),
                              "count": str(run.count), "kind": "zero" if run.zero else "page"}
            if run.zero and run.fill:
                run_attributes["fill"] = hex(run.fill)
            if run.named:
                run_attributes["named"] = "yes"
            etree.SubElement(element, "run", run_attributes)
        return element
    element = etree.Element("device", attributes)
    in_vcpu = set(cpu.REGISTER_FIELDS) if section.name == cpu.CPU_SECTION else set()
    _group_children(element, section.device, "", in_vcpu)
    return element


def _group_children(parent, group: Group, prefix: str, in_vcpu: set[str]) -> None:
    for item in group.fields:
        path = prefix + item.name + (f"[{item.index}]" if item.index is not None else "")
        if isinstance(item, Leaf):
            parent.append(_leaf_element(item, path in in_vcpu))
            continue
        attributes = {"name": item.name, "type": item.type, "size": str(item.size),
                      "vmsd": item.vmsd_name, "version": str(item.version)}
        if item.index is not None:
            attributes["index"] = str(item.index)
        if item.array:
            attributes["array"] = "yes"
        nested = etree.SubElement(parent, "struct", attributes)
        for number, element_group in enumerate(item.elements):
            element = etree.SubElement(nested, "element")
            suffix = f"[{number}]" if item.array else ""
            _group_children(element, element_group, f"{path}{suffix}.", in_vcpu)
    for sub in group.subsections:
        element = etree.SubElement(parent, "subsection", name=sub.name, version=str(sub.version))
        _group_children(element, sub.body, f"{prefix}{sub.name}:", in_vcpu)


def _leaf_element(leaf: Leaf, in_vcpu: bool):
    attributes = {"name": leaf.name, "type": leaf.type, "size": str(leaf.size)}
    if leaf.count > 1:
        attributes["count"] = str(leaf.count)
    if leaf.index is not None:
        attributes["index"] = str(leaf.index)
    if in_vcpu:
        attributes["in-vcpu"] = "yes"
    else:
        attributes["value"] = format_leaf(leaf)
    return etree.Element("field", attributes)


def format_leaf(leaf: Leaf) -> str:
    if leaf.is_integer:
        return " ".join(str(v) if leaf.type in SIGNED_TYPES and v < 0 else hex(v)
                        for v in leaf.values())
    chunks = [leaf.data[i * leaf.size:(i + 1) * leaf.size].hex() for i in range(leaf.count)]
    return " ".join(chunks) if leaf.size else ""


# -- reading -------------------------------------------------------------------------------------

@dataclass
class StateDocument:
    stream: QemuStream                 # no data: pages come from the core
    provenance: Provenance
    views: list[VcpuView]


@functools.cache
def schema() -> etree.RelaxNG:
    if importlib.util.find_spec("vmstate.schemas") is not None:
        text = (importlib.resources.files("vmstate.schemas") / SCHEMA_FILE).read_bytes()
    else:
        text = (Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_FILE).read_bytes()
    return etree.RelaxNG(etree.fromstring(text))


def from_xml(data: bytes, source: str) -> StateDocument:
    root = parse_xml(data, source)
    if root.tag != ROOT:
        raise XmlError(f"root element <{root.tag}>, expected <{ROOT}>", f"{source}:1")
    # The page digests' base64 is checked by _document's strict decoding instead of the
    # schema's base64Binary: that check took 25 ms of a 1 GiB guest's join.
    digests = root.find("page-digests")
    digests_text = digests.text if digests is not None else None
    if digests is not None:
        digests.text = None
    validator = schema()
    if not validator.validate(root):
        error = validator.error_log[0]
        raise XmlError(f"does not match the schema: {error.message}", f"{source}:{error.line}")
    if digests is not None:
        digests.text = digests_text
    try:
        return _document(root)
    except _Invalid as e:
        raise XmlError(str(e), f"{source}:{e.line}") from None


def _int(element, attribute: str, bits: int = 64) -> int:
    text = element.get(attribute)
    label = f"<{element.tag} name=\"{element.get('name')}\">" if element.get("name") \
        else f"<{element.tag}>"
    try:
        value = int(text, 0)
    except (TypeError, ValueError):
        raise _Invalid(element, f"{label} {attribute}={text!r} is not a number") from None
    if not 0 <= value < 1 << bits:
        raise _Invalid(element, f"{label} {attribute}={text!r} does not fit in {bits} bits")
    return value


XML_WHITESPACE = str.maketrans("", "", " \t\r\n")


def _strict_base64(text: str) -> bytes:
    """base64 as XML Schema's base64Binary has it: XML whitespace (space, tab, CR, LF)
    anywhere, any other character outside the alphabet an error (b64decode's default would
    skip it)."""
    return base64.b64decode(text.translate(XML_WHITESPACE), validate=True)


def _document(root) -> StateDocument:
    _check_names(root)
    provenance_element = root.find("provenance")
    blocks = [RamBlock(element.get("name"), _int(element, "size"))
              for element in root.find("ram-blocks")]
    try:
        digests = _strict_base64(root.findtext("page-digests") or "")
        description = _strict_base64(root.findtext("description") or "")
    except ValueError:                      # binascii.Error, or a character beyond ASCII
        raise _Invalid(root.find("description"), "page-digests or description is not "
                                                 "base64") from None
    views = [_vcpu_view(element) for element in root.findall("vcpu")]
    by_id = {view.id: view for view in views}
    sections = [_section(element, blocks, by_id) for element in root.find("sections")]
    provenance = Provenance(_int(provenance_element, "stream-digest"),
                            provenance_element.get("stream-file"),
                            provenance_element.get("core-file"), digests)
    stream = QemuStream("", root.get("machine"), blocks, sections, description)
    return StateDocument(stream, provenance, views)


def _vcpu_view(element) -> VcpuView:
    values = {}
    for reg in element.find("registers"):
        values["registers", reg.get("name"), "value"] = _int(reg, "value")
    for segment in element.find("segments"):
        name = segment.get("name")
        values["segment", name, "selector"] = _int(segment, "selector", 32)
        values["segment", name, "base"] = _int(segment, "base")
        values["segment", name, "limit"] = _int(segment, "limit", 32)
        parts = {key: _int(segment, key, 32) for key, _, _ in cpu.DESCRIPTOR_BITS}
        for key, _, mask in cpu.DESCRIPTOR_BITS:
            if parts[key] > mask:
                raise _Invalid(segment, f"segment {name}: {key}={parts[key]} does not fit in "
                                        f"{mask.bit_length()} bits")
        parts["other-flags"] = _int(segment, "other-flags", 32) \
            if segment.get("other-flags") else 0
        if parts["other-flags"] & cpu.DESCRIPTOR_MASK:
            raise _Invalid(segment, f"segment {name}: other-flags overlaps the descriptor bits")
        values["segment", name, "flags"] = cpu.join_flags(parts)
    for table in element.findall("descriptor-table"):
        values["table", table.get("name"), "base"] = _int(table, "base")
        values["table", table.get("name"), "limit"] = _int(table, "limit", 32)
    for reg in element.find("control"):
        values["control", reg.get("name"), "value"] = _int(reg, "value")
    return VcpuView(int(element.get("id")), values, element.get("hflags") == "derived")


def _check_names(root) -> None:
    """The stream holds names as Latin-1 bytes: a name of other characters cannot be written."""
    for element in root.iter():
        for attribute in ("name", "machine"):
            value = element.get(attribute)
            if value is None:
                continue
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise _Invalid(element, f"<{element.tag}> {attribute}={shorten(value)!r} is not "
                                        "Latin-1 text (the stream holds names as bytes)") from None


def _section(element, blocks: list[RamBlock], views: dict[int, VcpuView]) -> Section:
    kind = layout.SECTION_KINDS[element.get("kind")]
    named = kind in layout.NAMED_SECTIONS
    if named and (element.get("instance") is None or element.get("version") is None):
        raise _Invalid(element, f"<{element.tag} name=\"{element.get('name')}\"> of kind "
                                f"{element.get('kind')!r} needs instance= and version=")
    section = Section(kind, int(element.get("id")), element.get("name"),
                      int(element.get("instance", -1)) if named else -1,
                      int(element.get("version", -1)) if named else -1)
    if element.tag == "ram-section":
        section.mem_size = element.get("block-list") == "yes"
        names = {block.name: i for i, block in enumerate(blocks)}
        for run in element:
            block = names.get(run.get("block"))
            if block is None:
                raise _Invalid(run, f"run of unknown block {run.get('block')!r}")
            first, count = _int(run, "first"), int(run.get("count"))
            if first + count > blocks[block].pages or (run.get("named") == "yes" and count != 1):
                raise _Invalid(run, f"run of {count} pages from page {first:#x} does not fit "
                                    f"block {blocks[block].name!r}")
            section.runs.append(PageRun(block, first, count, run.get("kind") == "zero",
                                        _int(run, "fill", 8) if run.get("fill") else 0,
                                        run.get("named") == "yes"))
        return section
    view = views.get(section.instance) if section.name == cpu.CPU_SECTION else None
    if section.name == cpu.CPU_SECTION and view is None:
        raise _Invalid(element, f"cpu section instance {section.instance} has no <vcpu "
                                f"id=\"{section.instance}\">")
    section.device = _group(element, "", view)
    return section


def _group(parent, prefix: str, view: VcpuView | None) -> Group:
    group = Group()
    for child in parent:
        if child.tag == "subsection":
            name = child.get("name")
            group.subsections.append(Subsection(name, int(child.get("version")),
                                                _group(child, f"{prefix}{name}:", view)))
            continue
        index = int(child.get("index")) if child.get("index") is not None else None
        path = prefix + child.get("name") + (f"[{index}]" if index is not None else "")
        if child.tag == "field":
            group.fields.append(_leaf(child, path, index, view))
            continue
        array = child.get("array") == "yes"
        elements = [_group(element, f"{path}[{n}]." if array else f"{path}.", view)
                    for n, element in enumerate(child)]
        group.fields.append(Nested(child.get("name"), child.get("type"), int(child.get("size")),
                                   child.get("vmsd"), int(child.get("version")), elements,
                                   index, array))
    return group


def _leaf(element, path: str, index: int | None, view: VcpuView | None) -> Leaf:
    kind, size = element.get("type"), int(element.get("size"))
    count = int(element.get("count", 1))
    leaf = Leaf(element.get("name"), kind, size, count, b"", index)
    if element.get("in-vcpu") == "yes":
        keys = cpu.REGISTER_FIELDS.get(path) if view is not None else None
        if keys is None or len(keys) != count:
            raise _Invalid(element, f"field {path} is not one <vcpu> holds")
        values = [view.values.get(key) for key in keys]
        if None in values:
            raise _Invalid(element, f"field {path}: <vcpu id=\"{view.id}\"> lacks "
                                    f"{keys[values.index(None)][1]}")
        leaf.data = _encode_integers(element, path, values, size, False)
        return leaf
    text = element.get("value")
    if text is None:
        raise _Invalid(element, f"field {path} has no value")
    words = text.split()
    if len(words) != count and size:
        raise _Invalid(element, f"field {path}: {len(words)} values for {count} elements")
    if kind in INTEGER_TYPES and size in (1, 2, 4, 8):
        try:
            values = [int(word, 0) for word in words]
        except ValueError:
            raise _Invalid(element, f"field {path}: {text!r} is not a list of numbers") from None
        leaf.data = _encode_integers(element, path, values, size, kind in SIGNED_TYPES)
        return leaf
    try:
        chunks = [bytes.fromhex(word) for word in words]
    except ValueError:
        raise _Invalid(element, f"field {path}: {text!r} is not hexadecimal bytes") from None
    for chunk in chunks:
        if len(chunk) != size:
            raise _Invalid(element, f"field {path}: {len(chunk)} bytes where the field holds "
                                    f"{size}")
    leaf.data = b"".join(chunks)
    return leaf


def _encode_integers(element, path: str, values: list[int], size: int, signed: bool) -> bytes:
    out = []
    low = -(1 << (8 * size - 1)) if signed else 0
    for value in values:
        if not low <= value < 1 << (8 * size):
            raise _Invalid(element, f"field {path}: value {value:#x} does not fit in its "
                                    f"{size} bytes")
        out.append((value & ((1 << 8 * size) - 1)).to_bytes(size, "big"))
    return b"".join(out)
