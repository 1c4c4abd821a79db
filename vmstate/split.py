"""`vmstate split`: an image becomes an ELF core (memory, for gdb) and an XML file (hardware)."""

from __future__ import annotations

import importlib
from array import array
from dataclasses import dataclass

import xxhash

from .atomic import atomic_output
from .background import BackgroundCall
from .core import CoreLayout, write_core
from .errors import ImageError
from .image.reader import Image
from .state import PAGE_SIZE


DEFAULT_CORE, DEFAULT_XML = "vm.core", "hw.xml"


@dataclass(frozen=True)
class SplitResult:
    core: CoreLayout
    xml_bytes: int


# base64 of 8 bytes a page must stay below libxml2's 10 MB text node limit (no huge_tree).
MAX_DIGESTED_PAGES = 800_000


def page_digests(image: Image) -> tuple[bytes, ...]:
    """Per region: the XXH3-64 of each present page, in order, as packed little-endian u64.
    A region with more present pages gets none: join then reports every present page of a
    changed chunk as changed."""
    digests = []
    digest = xxhash.xxh3_64_intdigest
    for index, region in enumerate(image.state.memory):
        if region.present_pages > MAX_DIGESTED_PAGES:
            digests.append(b"")
            continue
        view = image.region_view(index)
        values = array("Q", [digest(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
                             for first, count in region.present
                             for page in range(first, first + count)])
        digests.append(values.tobytes())
    return tuple(digests)


def _verified_page_digests(image: Image) -> tuple[bytes, ...]:
    """Runs while the core is written: its I/O errors are the image's, not the core's."""
    try:
        image.verify_memory()
        return page_digests(image)
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror}", image.path) from None


def split(image_path: str, core_path: str, xml_path: str) -> SplitResult:
    # The XML writer (lxml) is imported while the image is opened and the core written: the
    # writes release the GIL, so the import costs no time of its own.
    hwxml = BackgroundCall(lambda: importlib.import_module("vmstate.hwxml"), "import-hwxml")
    with Image(image_path) as image:
        # The image is checked and its pages digested while the core is written (hashing and
        # writing overlap); a failed check discards the core before it gets its name.
        checked = BackgroundCall(lambda: _verified_page_digests(image), "verify-image")
        layout = write_core(core_path, image, before_commit=checked.result)
        provenance = hwxml.result().Provenance(image.digest(), image_path, core_path,
                                               checked.result())
        document = hwxml.result().to_xml(image.state, provenance)
    with atomic_output(xml_path, durable=False) as f:
        f.write(document)
    return SplitResult(layout, len(document))
