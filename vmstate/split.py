"""`vmstate split`: an image becomes an ELF core (memory, for gdb) and an XML file (hardware)."""

from __future__ import annotations

import importlib
from array import array

import xxhash

from .atomic import atomic_output
from .background import BackgroundCall
from .core import CoreLayout, write_core
from .errors import ImageError
from .image.reader import Image
from .record import record
from .state import PAGE_SIZE


DEFAULT_CORE, DEFAULT_XML = "vm.core", "hw.xml"


@record
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
                             for first, count in region.present.runs
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


def _document(image: Image, image_path: str, core_path: str, hwxml: BackgroundCall) -> bytes:
    """The hardware XML, pages digested (and the image checked) first."""
    digests = _verified_page_digests(image)
    module = hwxml.result()
    provenance = module.Provenance(image.digest(), image_path, core_path, digests)
    return module.to_xml(image.state, provenance)


def split(image_path: str, core_path: str, xml_path: str) -> SplitResult:
    # While the core's memory is written (the writes release the GIL), threads import the
    # XML writer (lxml), check the image, digest its pages and build the XML; a failed check
    # discards the core before it gets its name.
    hwxml = BackgroundCall(lambda: importlib.import_module("vmstate.hwxml"), "import-hwxml")
    with Image(image_path) as image:
        xml = BackgroundCall(lambda: _document(image, image_path, core_path, hwxml),
                             "verify-and-describe")
        layout = write_core(core_path, image, before_commit=xml.result)
        document = xml.result()
    with atomic_output(xml_path, durable=False) as f:
        f.write(document)
    return SplitResult(layout, len(document))
