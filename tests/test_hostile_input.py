"""Crafted inputs that fuzzing (tests/fuzz/) found ending in an internal error: each must get
one line naming what and where, a non-zero exit, and leave no output behind."""

from dataclasses import replace

import pytest

from helpers import one_line_error
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
