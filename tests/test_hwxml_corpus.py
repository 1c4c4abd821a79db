"""Hardware XML that join must refuse, each with its own message (as libvirt's schema tests
keep invalid domain XML next to valid samples). Every file in tests/data/hwxml-invalid is the
valid sample with one edit and says on its second line what join must answer:
`<!-- expect: :LINE: <element attribute="value">: reason -->`, after the file's name."""

import re
import shutil
from pathlib import Path

import pytest

from helpers import one_line_error
from strategies import memory_views, restorable_sample_state
from vmstate.image.writer import write_image

DATA = Path(__file__).resolve().parent / "data"
VALID = DATA / "hwxml-valid" / "sample.xml"
INVALID = sorted((DATA / "hwxml-invalid").glob("*.xml"))
EXPECT = re.compile(r"<!-- expect: (.*) -->")


def _expected(path: Path) -> str:
    return EXPECT.search(path.read_text().splitlines()[1])[1]


@pytest.fixture
def sample_split(vmstate, tmp_path):
    """The restorable sample state as an image, split by the command as a user would."""
    state, contents = restorable_sample_state()
    write_image(str(tmp_path / "sample.sav"), state, memory_views(contents))
    result = vmstate("split", "sample.sav")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_the_valid_sample_is_what_split_writes_and_joins_unchanged(vmstate, sample_split):
    assert (sample_split / "hw.xml").read_bytes() == VALID.read_bytes()
    result = vmstate("join", "vm.core", VALID, "-o", "again.sav")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"no changes: the image is rebuilt as it was\n"
    assert (sample_split / "again.sav").read_bytes() == (sample_split / "sample.sav").read_bytes()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_join_refuses_each_invalid_file_with_its_own_message(vmstate, sample_split, path):
    shutil.copy(path, sample_split / path.name)
    result = vmstate("join", "vm.core", path.name, "-o", "out.sav")
    assert result.returncode == 125
    assert one_line_error(result) == f"vmstate: {path.name}{_expected(path)}"
    assert not (sample_split / "out.sav").exists()


def test_every_invalid_file_has_a_message_of_its_own():
    messages = [_expected(path) for path in INVALID]
    assert len(INVALID) >= 15 and len(set(messages)) == len(messages)
