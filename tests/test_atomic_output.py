"""What an output promises (vmstate.atomic): never a half file under its name, and an fsync
for durable outputs (a saved VM) but none for derived ones (split's and join's outputs),
which are re-made from inputs that stay."""

import os

import pytest

from vmstate.atomic import atomic_output


@pytest.fixture
def fsyncs(monkeypatch):
    """The file descriptors os.fsync is called on, in order (the calls still happen)."""
    calls, real = [], os.fsync

    def spy(fd):
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    return calls


@pytest.mark.parametrize("durable, expected_fsyncs", [(True, 2), (False, 0)])
def test_an_output_is_named_once_complete_and_fsynced_only_if_durable(
        tmp_path, fsyncs, durable, expected_fsyncs):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(str(target), durable) as f:
        f.write(b"new contents")
        assert target.read_bytes() == b"old"           # no name until complete
    assert target.read_bytes() == b"new contents"
    assert len(fsyncs) == expected_fsyncs              # durable: the data, then the directory
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_failed_output_leaves_the_old_file_and_nothing_else(tmp_path, durable):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(str(target), durable) as f:
            f.write(b"half")
            raise RuntimeError("failed midway")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.kvm
def test_save_is_durable_and_split_and_join_are_not(vmstate, example, tmp_path, fsyncs):
    """save (here the library call the VMM makes) fsyncs; split and join, run in this process,
    do not, and join(split(x)) is still x."""
    from vmstate.image.reader import Image
    from vmstate.image.writer import write_image
    from vmstate.join import join
    from vmstate.split import split
    assert vmstate("run", example("lab_app")).returncode == 0
    image = str(tmp_path / "vm_image.sav")
    with Image(image) as source:
        write_image(str(tmp_path / "saved.sav"), source.state,
                    [source.region_view(i) for i in range(len(source.state.memory))])
    assert len(fsyncs) == 2
    fsyncs.clear()
    core, xml = str(tmp_path / "vm.core"), str(tmp_path / "hw.xml")
    split(image, core, xml)
    _, joined = join(core, xml, (tmp_path / "hw.xml").read_bytes())
    try:
        joined.write(str(tmp_path / "joined.sav"))
    finally:
        joined.close()
    assert fsyncs == []
    assert (tmp_path / "joined.sav").read_bytes() == (tmp_path / "vm_image.sav").read_bytes()
    assert (tmp_path / "saved.sav").read_bytes() == (tmp_path / "vm_image.sav").read_bytes()
