"""The image format without KVM: lossless round trips (Hypothesis), and every kind of damage
detected with a message that names the place."""

import os
import random
import re
import subprocess
import time
from dataclasses import replace
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings

from strategies import LAYOUTS, layout_state, memory_views, sample_state, vm_states
from vmstate.errors import ImageError, VmstateError
from vmstate.image import layout as L
from vmstate.image.reader import Image
from vmstate.image.writer import write_image
from vmstate.state import PAGE_SIZE, GuestOs, Pipe
from vmstate.validate import problems

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(generated=vm_states())
def test_write_read_rewrite_is_lossless_and_byte_identical(tmp_path, generated):
    state, contents = generated
    first, second = tmp_path / "first.sav", tmp_path / "second.sav"
    write_image(str(first), state, memory_views(contents))
    with Image(str(first)) as image:
        assert image.state == state
        image.verify_memory()
        for index, data in enumerate(contents):
            assert image.region_view(index).tobytes() == data
        write_image(str(second), image.state,
                    [image.region_view(i) for i in range(len(contents))])
    assert first.read_bytes() == second.read_bytes()


@pytest.fixture
def sample_image(tmp_path):
    state, contents = sample_state()
    path = tmp_path / "sample.sav"
    write_image(str(path), state, memory_views(contents))
    return path


def _damaged(path, offset, xor=None, size=None):
    data = bytearray(path.read_bytes())
    if xor is not None:
        data[offset] ^= xor
    damaged = path.with_name(f"damaged-{offset}")
    damaged.write_bytes(bytes(data[:size]) if size is not None else bytes(data))
    return damaged


def _open_and_verify(path):
    with Image(str(path)) as image:
        image.verify_memory()


def test_every_metadata_bit_flip_is_detected(sample_image):
    with Image(str(sample_image)) as image:
        metadata_end = image.region_data[0].data_offset
    rng = random.Random(7)
    for offset in range(metadata_end):
        with pytest.raises(ImageError) as caught:
            _open_and_verify(_damaged(sample_image, offset, 1 << rng.randrange(8)))
        assert str(caught.value).startswith(f"{sample_image.parent}/damaged-{offset}: offset 0x")


def test_memory_bit_flips_are_detected_in_extents_and_in_holes(sample_image):
    with Image(str(sample_image)) as image:
        data_offset = image.region_data[0].data_offset
        region = image.state.memory[0]
    present = {first + i for first, count in region.present.runs for i in range(count)}
    absent = set(range(region.page_count)) - present
    assert present and absent
    for page, expected in ((min(present), "fails its checksum"),
                           (max(present), "fails its checksum"),
                           (min(absent), "recorded as never touched holds data")):
        offset = data_offset + page * PAGE_SIZE + 123
        with pytest.raises(ImageError, match=expected) as caught:
            _open_and_verify(_damaged(sample_image, offset, 0x10))
        reported = re.search(r"offset (0x[0-9a-f]+): guest memory (0x[0-9a-f]+)(?:-(0x[0-9a-f]+))?",
                             str(caught.value))
        file_offset, start, end = (int(x, 16) if x else None for x in reported.groups())
        assert start <= page * PAGE_SIZE < (end or start + PAGE_SIZE)
        assert file_offset == data_offset + start


def test_truncation_anywhere_is_detected(sample_image):
    size = sample_image.stat().st_size
    cuts = [0, 1, 8, 63, 64, 65, 100, 200, 1000, 4096, size - PAGE_SIZE, size - 1]
    for cut in cuts:
        with pytest.raises(ImageError, match="truncated|past the end|empty"):
            _open_and_verify(_damaged(sample_image, 0, size=cut))


def test_bad_magic_and_other_versions(sample_image):
    with pytest.raises(ImageError, match=r"offset 0x0: bad magic b'XMSTATE\\x00'"):
        _open_and_verify(_damaged(sample_image, 0, ord("V") ^ ord("X")))
    minor = L.VERSION_MINOR
    for major, expected in ((3, rf"format version 3\.{minor} is newer than this vmstate"),
                            (1, rf"format version 1\.{minor} is older than this vmstate "
                                r"\(reads 2\.x")):
        data = bytearray(sample_image.read_bytes())
        header = list(L.HEADER.unpack_from(data))
        header[1] = major
        data[:L.HEADER.size] = L.HEADER.pack(*header)
        other = sample_image.with_name(f"v{major}.sav")
        other.write_bytes(bytes(data))
        with pytest.raises(ImageError, match=expected):
            _open_and_verify(other)


def test_unknown_mandatory_section_is_refused(tmp_path):
    state, contents = sample_state()
    mandatory = replace(state, extra=(replace(state.extra[0], flags=0),))
    path = tmp_path / "mandatory.sav"
    write_image(str(path), mandatory, memory_views(contents))
    with pytest.raises(ImageError, match="unknown mandatory section"):
        _open_and_verify(path)


def test_an_early_2_1_image_with_saved_by_as_0x0034_is_read(tmp_path):
    """The first 2.1 writers gave vmm-saved-by the type vmm-os has now, flagged OPTIONAL (and
    wrote no vmm-os): such an image reads with its saved-by and without OS state."""
    state, contents = sample_state()
    early = _with_vmm(state, os=None, saved_by="soft")
    path = tmp_path / "early.sav"
    with patch.object(L, "VMM_SAVED_BY", L.EARLY_SAVED_BY), \
            patch.object(L, "OPTIONAL_TYPES", L.OPTIONAL_TYPES | {L.EARLY_SAVED_BY}):
        write_image(str(path), early, memory_views(contents))
    with Image(str(path)) as image:
        assert [entry.type for entry in image.sections].count(L.VMM_OS) == 1
        assert image.state.vmm.saved_by == "soft" and image.state.vmm.os is None
        image.verify_memory()


def test_file_table_path_outside_root_is_refused(tmp_path):
    state, contents = sample_state()
    for bad in ("../escape.txt", "/etc/passwd", "a/../../b"):
        files = (replace(state.vmm.files[0], kind="file", path=bad),)
        path = tmp_path / "escape.sav"
        write_image(str(path), replace(state, vmm=replace(state.vmm, files=files)),
                    memory_views(contents))
        with pytest.raises(ImageError, match="is outside the guest root"):
            _open_and_verify(path)


def _with_vmm(state, **changes):
    return replace(state, vmm=replace(state.vmm, **changes))


def _with_space(state, **changes):
    return _with_vmm(state, address_space=replace(state.vmm.address_space, **changes))


def _with_file(state, **changes):
    return _with_vmm(state, files=(replace(state.vmm.files[1], **changes),))


INVALID_STATES = {
    "MSR 0xc0000082 appears 2 times": lambda s: replace(s, vcpus=(replace(
        s.vcpus[0], msrs=s.vcpus[0].msrs + ((0xC0000082, 1),)),)),
    "offset 9223372036854775808 is beyond": lambda s: _with_file(s, offset=1 << 63),
    "mode 04777 has set-uid": lambda s: _with_file(s, mode=0o4777),
    "guest fd 2147483647 is out of range": lambda s: _with_file(s, fd=2147483647),
    "brk 0x18000 is above mmap_low": lambda s: _with_space(s, brk=0x18000),
    "user_end 0xffffffffffffffff is beyond guest memory": lambda s: _with_space(
        s, user_end=(1 << 64) - 1),
    "free range 0x90000+0x1000 is not whole pages inside": lambda s: _with_space(
        s, free_ranges=((0x90000, 0x1000),)),
}


@pytest.mark.parametrize("guest_os, expected", [
    (GuestOs(umask=0o1777), "umask 0o1777 has bits beyond 0777"),
    (GuestOs(pipes=(Pipe(3, bytes((1 << 20) + 1)),)),
     "pipe 3 holds 1048577 bytes (at most 1048576)"),
])
def test_join_refuses_what_the_image_format_cannot_hold(guest_os, expected):
    """What the vmm-os decoder refuses, validate refuses first, so join never writes it."""
    state, _ = sample_state()
    assert expected in [p.message for p in problems(_with_vmm(state, os=guest_os))]


@pytest.mark.parametrize("expected", INVALID_STATES)
def test_the_reader_refuses_what_join_refuses(tmp_path, expected):
    """The image reader runs vmstate.validate.problems, the checks join runs before writing."""
    state, contents = sample_state()
    path = tmp_path / "invalid.sav"
    write_image(str(path), INVALID_STATES[expected](state), memory_views(contents))
    with pytest.raises(ImageError, match=f"not a valid VM state: .*{re.escape(expected)}"):
        _open_and_verify(path)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs, so that a write runs out of space half way."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)]
                      ).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_no_partial_file_when_the_disk_fills(tiny_filesystem):
    state, contents = sample_state()
    with pytest.raises(VmstateError, match="cannot write .*out.sav: No space left on device"):
        write_image(str(tiny_filesystem / "out.sav"), state, memory_views(contents))
    assert os.listdir(tiny_filesystem) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_round_trips_and_damage_is_found(tmp_path, layout):
    """However scattered the present pages, the region payload has the same size, the image
    reads back, and a flipped bit in a present page or a hole is found and placed."""
    state, contents = layout_state(layout)
    path = tmp_path / "image.sav"
    write_image(str(path), state, memory_views(contents))
    with Image(str(path)) as image:
        image.verify_memory()
        assert image.state.memory == state.memory
        assert image.region_view(0).tobytes() == contents[0]
        data_offset = image.region_data[0].data_offset
        region_section = next(e for e in image.sections if e.type == L.MEMORY_REGION)
        assert region_section.size == 32 + 4096 // 8 + 8 * (4096 // 256)
    runs = state.memory[0].present.runs
    first, count = runs[len(runs) // 2]
    page = first + count - 1
    chunk_start = page // 256 * 256 * PAGE_SIZE
    with pytest.raises(ImageError, match=f"offset {data_offset + chunk_start:#x}: guest memory "
                                         f"{chunk_start:#x}-{chunk_start + (256 << 12):#x} "
                                         "fails its checksum"):
        _open_and_verify(_damaged(path, data_offset + page * PAGE_SIZE + 5, 0x01))
    if layout != "fully written":
        hole = page + 1 if page + 1 < 4096 and (page + 1, 1) not in runs else first - 1
        with pytest.raises(ImageError, match="recorded as never touched holds data"):
            _open_and_verify(_damaged(path, data_offset + hole * PAGE_SIZE + 7, 0x01))


@pytest.mark.parametrize("thread_max", [0, 64 << 20], ids=["children", "thread"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_memory_check_in_shares_finds_what_verify_memory_finds(tmp_path, monkeypatch,
                                                                   layout, thread_max):
    """Restore verifies a large image's memory in two child processes, one share of the
    chunks each, a small one's in a thread: damage in a present page or a hole of any chunk
    fails the share that holds it, with verify_memory's own message, and the check as a
    whole, either way; the other share passes."""
    import vmstate.image.reader
    monkeypatch.setattr(vmstate.image.reader, "MEMORY_CHECK_THREAD_MAX", thread_max)
    state, contents = layout_state(layout)
    path = tmp_path / "image.sav"
    write_image(str(path), state, memory_views(contents))
    with Image(str(path)) as image:
        data_offset = image.region_data[0].data_offset
        check = image.start_memory_check()
        assert bool(check._children) == (thread_max == 0)
        check.result()
    runs = state.memory[0].present.runs
    damaged = [runs[0][0], sum(runs[-1]) - 1]
    if layout != "fully written":
        damaged += [runs[0][0] - 1 if runs[0][0] else sum(runs[0]), 4095 if sum(runs[-1]) < 4096
                    else runs[-1][0] - 1]                              # holes
    for page in damaged:
        share = page // 256 // 8             # 16 chunks of 256 pages: 0-7 share 0, 8-15 share 1
        with Image(str(_damaged(path, data_offset + page * PAGE_SIZE + 9, 0x10))) as image:
            with pytest.raises(ImageError) as whole:
                image.verify_memory()
            with pytest.raises(ImageError) as shared:
                image.start_memory_check().result()
            assert str(shared.value) == str(whole.value)
            with pytest.raises(ImageError):
                image.verify_memory(share, 2)
            image.verify_memory(1 - share, 2)


def test_closing_a_memory_check_ends_its_thread_before_the_image_closes(tmp_path, monkeypatch):
    """Restore closes the check, then the image: a check thread still running would go on
    reading a closed descriptor, which a long-lived host may have given to another file.
    (The check is slowed down so that it is still running when close() is called.)"""
    import threading
    state, contents = layout_state("fully written")
    path = tmp_path / "image.sav"
    write_image(str(path), state, memory_views(contents))
    with Image(str(path)) as image:
        verify = image.verify_memory
        monkeypatch.setattr(image, "verify_memory", lambda: (time.sleep(0.5), verify()))
        check = image.start_memory_check()
        assert check._thread is not None                      # a small image: a thread
        check.close()
        assert not any(t.name == "verify-memory" for t in threading.enumerate())


@pytest.mark.parametrize("runs", [
    (), ((0, 1),), ((3, 1), (9, 2), (250, 12), (300, 1)),      # 250+12 crosses into chunk 1
    ((0, 1024),), ((1, 1023),), tuple((page, 1) for page in range(0, 1024, 4)),
    ((200, 600), (900, 1), (1020, 4))])
def test_checksums_read_from_the_file_are_the_checksums_of_the_memory(tmp_path, runs):
    """file_chunk_checksums (a chunk of one run hashed from the mapping, any other read with
    one pread per run) gives what chunk_checksums gives over the same bytes, for runs
    within, across and filling chunks."""
    import mmap
    from vmstate.chunks import chunk_checksums, file_chunk_checksums
    pages = 1024
    data = random.Random(len(runs)).randbytes(pages * PAGE_SIZE)
    path = tmp_path / "data"
    path.write_bytes(bytes(PAGE_SIZE) + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapping:
            view = memoryview(mapping)[PAGE_SIZE:]
            assert file_chunk_checksums(fd, PAGE_SIZE, view, runs, pages) == \
                chunk_checksums(memoryview(data), runs, pages)
            del view
    finally:
        os.close(fd)


def test_checksums_read_from_a_file_that_shrank_fail_where_it_ends(tmp_path):
    from vmstate.chunks import chunk_checksums, file_chunk_checksums
    pages, runs = 1024, tuple((page, 1) for page in range(0, 1024, 4))   # all read by pread
    data = random.Random(5).randbytes(pages * PAGE_SIZE)
    path = tmp_path / "data"
    path.write_bytes(bytes(PAGE_SIZE) + data[:600 * PAGE_SIZE + 100])       # ends in chunk 2
    fd = os.open(path, os.O_RDONLY)
    try:
        shrunk = file_chunk_checksums(fd, PAGE_SIZE, None, runs, pages)
    finally:
        os.close(fd)
    expected = chunk_checksums(memoryview(data), runs, pages)
    assert shrunk[:2] == expected[:2]
    assert shrunk[2] != expected[2] and shrunk[3] != expected[3]
