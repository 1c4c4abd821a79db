"""Device sections of a QEMU stream read and written through the JSON description QEMU
appends to the stream (QEMU's "vmdesc"): it names every field written, with its type and size,
arrays (`array_len`, or one entry per element with `index`), nested structures (`struct`, or
`fields` for VMSTATE_WITH_TMP) and the subsections present. It gives no offsets: a field's
bytes follow the previous field's. A section's bytes become a tree of `Field`s holding the
raw big-endian bytes of each leaf; writing the tree back gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import layout

INTEGER_TYPES = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                 "bool", "int32 le", "int32 equal", "uint8 equal", "uint16 equal",
                 "uint32 equal", "uint64 equal", "timer", "uint8 le", "int64 le"}
SIGNED_TYPES = {"int8", "int16", "int32", "int64", "int32 le", "int32 equal", "int64 le"}
NESTED_TYPES = {"struct", "tmp"}


class DescriptionError(Exception):
    """A construct of the description or the stream this reader does not handle; the stream
    reader adds the section and offset."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


@dataclass
class Leaf:
    """One described field: `count` elements of `size` bytes (`count` > 1 for array_len)."""
    name: str
    type: str
    size: int
    count: int
    data: bytes
    index: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.type in INTEGER_TYPES and self.size in (1, 2, 4, 8)

    def values(self) -> list[int]:
        return [int.from_bytes(self.data[i * self.size:(i + 1) * self.size], "big",
                               signed=self.type in SIGNED_TYPES) for i in range(self.count)]


@dataclass
class Group:
    """The fields of one structure (a section, a struct element, a subsection), then the
    subsections that followed them."""
    fields: list = field(default_factory=list)            # Leaf | Nested
    subsections: list = field(default_factory=list)       # Subsection


@dataclass
class Nested:
    """A described struct (or VMSTATE_WITH_TMP) field: one Group per element."""
    name: str
    type: str
    size: int
    vmsd_name: str
    version: int
    elements: list[Group]
    index: int | None = None
    array: bool = False                 # described with array_len (else one element)


@dataclass
class Subsection:
    name: str
    version: int
    body: Group


def leaves(group: Group, prefix: str = ""):
    """(dotted path, Leaf) for every leaf under `group`, in stream order."""
    for item in group.fields:
        name = prefix + item.name + (f"[{item.index}]" if item.index is not None else "")
        if isinstance(item, Leaf):
            yield name, item
        else:
            for number, element in enumerate(item.elements):
                suffix = f"[{number}]" if item.array else ""
                yield from leaves(element, f"{name}{suffix}.")
    for sub in group.subsections:
        yield from leaves(sub.body, f"{prefix}{sub.name}:")


class Decoder:
    """Reads a section body from `data` (a bytes-like) at `offset`, as the description says."""

    def __init__(self, data, offset: int, end: int):
        self.data, self.offset, self.end = data, offset, end

    def take(self, length: int, what: str) -> bytes:
        if self.offset + length > self.end:
            raise DescriptionError(f"{what}: {length} bytes run past the end of the stream",
                                   self.offset)
        chunk = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        return chunk

    def device(self, entry: dict) -> Group:
        """The body of a device section that the description's `entry` describes."""
        try:
            return self.group(entry.get("fields", []), entry.get("subsections", []))
        except RecursionError:
            raise DescriptionError("the description nests too deeply", self.offset) from None

    def group(self, fields: list, subsections: list) -> Group:
        body = Group([self.field(entry) for entry in _entries(fields, self.offset)])
        for entry in _entries(subsections, self.offset):
            body.subsections.append(self.subsection(entry))
        return body

    def field(self, entry: dict):
        name, kind = _required(entry, "name", str, self.offset), _required(entry, "type", str,
                                                                            self.offset)
        size = _required(entry, "size", int, self.offset)
        count = entry.get("array_len", 1)
        index = entry.get("index")
        if not isinstance(count, int) or count < 1 or size < 0:
            raise DescriptionError(f"field {name}: bad size {size} or array_len {count}",
                                   self.offset)
        if kind in NESTED_TYPES:
            inner = entry.get("struct", entry) if kind == "struct" else entry
            if not isinstance(inner, dict) or "fields" not in inner:
                raise DescriptionError(f"field {name}: a {kind} with no fields described",
                                       self.offset)
            elements = []
            for _ in range(count):
                start = self.offset
                elements.append(self.group(inner.get("fields", []), inner.get("subsections", [])))
                if self.offset - start != size:
                    raise DescriptionError(
                        f"field {name}: its fields take {self.offset - start} bytes, the "
                        f"description says {size}", start)
            version = inner.get("version", 0)
            if not isinstance(version, int):
                raise DescriptionError(f"field {name}: version {version!r} is not a number",
                                       self.offset)
            return Nested(name, kind, size, str(inner.get("vmsd_name", "")), version, elements,
                          index, "array_len" in entry)
        if entry.get("struct") or entry.get("fields"):
            raise DescriptionError(f"field {name}: type {kind!r} with nested fields is not "
                                   "handled", self.offset)
        return Leaf(name, kind, size, count, self.take(size * count, f"field {name}"), index)

    def subsection(self, entry: dict) -> Subsection:
        name = _required(entry, "vmsd_name", str, self.offset)
        version = _required(entry, "version", int, self.offset)
        start = self.offset
        marker = self.take(1, f"subsection {name}")[0]
        length = self.take(1, f"subsection {name}")[0]
        found = self.take(length, f"subsection {name}").decode("latin-1")
        (found_version,) = layout.U32.unpack(self.take(4, f"subsection {name}"))
        if marker != layout.SUBSECTION or found != name or found_version != version:
            raise DescriptionError(f"subsection {name} version {version} described, the stream "
                                   f"has {found!r} version {found_version} (marker "
                                   f"{marker:#x})", start)
        return Subsection(name, version, self.group(entry.get("fields", []),
                                                    entry.get("subsections", [])))


def _entries(value, offset: int) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise DescriptionError(f"description: expected a list of objects, got {value!r:.80}",
                               offset)
    return value


def parse_description(description: bytes) -> dict:
    """QEMU's JSON description, its "devices" a list of objects (ValueError if not)."""
    try:
        parsed = json.loads(description)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    devices = parsed.get("devices") if isinstance(parsed, dict) else None
    if not isinstance(devices, list) or not all(isinstance(entry, dict) for entry in devices):
        raise ValueError('expected {"devices": [OBJECT, ...], ...}')
    return parsed


def _required(entry: dict, key: str, kind: type, offset: int):
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DescriptionError(f"description entry without a valid {key!r}: {entry!r:.80}",
                               offset)
    return value


def encode_group(body: Group, out: list[bytes]) -> None:
    """Append the stream bytes of `body` to `out` (the exact inverse of Decoder.group)."""
    for item in body.fields:
        if isinstance(item, Leaf):
            out.append(item.data)
        else:
            for element in item.elements:
                encode_group(element, out)
    for sub in body.subsections:
        name = sub.name.encode("latin-1")
        out.append(bytes([layout.SUBSECTION, len(name)]) + name + layout.U32.pack(sub.version))
        encode_group(sub.body, out)
