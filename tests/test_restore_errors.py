"""Bad images given to `vmstate restore` and `vmstate info`: one line, exit 125, and a guest
that never starts (the lab's output file stays exactly as the save left it)."""

import json
import os

import pytest

from helpers import one_line_error
from vmstate.image import layout as L
from vmstate.image.reader import Image
from vmstate.state import PAGE_SIZE

pytestmark = pytest.mark.kvm
NO_KVM = {"VMSTATE_KVM_DEVICE": "/nonexistent/kvm"}


@pytest.fixture
def lab_image(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    return tmp_path / "vm_image.sav"


def _corrupt(image, offset, xor=0x01):
    data = bytearray(image.read_bytes())
    data[offset] ^= xor
    image.write_bytes(bytes(data))


def _places(image):
    with Image(str(image)) as img:
        sregs = next(e for e in img.sections if e.type == L.VCPU_SREGS)
        rip_page = img.state.vcpus[0].regs.rip // PAGE_SIZE
        data_offset = img.region_data[0].data_offset
    return {"header": 20, "section table": L.HEADER.size + 5,
            "registers": sregs.offset + 3,
            "memory": data_offset + rip_page * PAGE_SIZE + 7}


@pytest.mark.parametrize("place", ["header", "section table", "registers", "memory"])
def test_flipped_bit_stops_restore_before_the_guest_runs(vmstate, lab_image, tmp_path, place):
    _corrupt(lab_image, _places(lab_image)[place])
    result = vmstate("restore", "vm_image.sav")
    assert result.returncode == 125
    message = one_line_error(result)
    assert "vm_image.sav: offset 0x" in message
    assert "corrupt" in message or "checksum" in message
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"


def test_truncated_image(vmstate, lab_image, tmp_path):
    data = lab_image.read_bytes()
    for cut in (10, 100, 5000, len(data) - 1):
        lab_image.write_bytes(data[:cut])
        result = vmstate("restore", "vm_image.sav")
        assert result.returncode == 125
        assert "truncated" in one_line_error(result)
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"


def test_wrong_magic_and_newer_version(vmstate, lab_image):
    original = lab_image.read_bytes()
    lab_image.write_bytes(b"QEVM" + original[4:])
    assert "bad magic" in one_line_error(vmstate("restore", "vm_image.sav"))
    header = list(L.HEADER.unpack_from(original))
    header[1] = 7
    lab_image.write_bytes(L.HEADER.pack(*header) + original[L.HEADER.size:])
    message = one_line_error(vmstate("info", "vm_image.sav"))
    assert f"format version 7.{header[2]} is newer than this vmstate (reads 2.x only)" in message


def test_not_an_image_and_missing_image(vmstate, example, tmp_path):
    assert "bad magic" in one_line_error(vmstate("restore", example("hello")))
    result = vmstate("restore", tmp_path / "none.sav")
    assert result.returncode == 127
    assert "no such image file" in one_line_error(result)


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo], ids=["directory", "fifo"])
def test_a_directory_or_fifo_is_not_an_image(vmstate, tmp_path, make):
    make(tmp_path / "odd.sav")                  # a FIFO must not block the reader
    for command in ("info", "restore", "send"):
        result = vmstate(command, "odd.sav", *(["127.0.0.1:9"] if command == "send" else []))
        assert result.returncode == 125
        assert "odd.sav: not a regular file" in one_line_error(result)


def test_info_shows_the_lab_state_without_kvm(vmstate, lab_image):
    result = vmstate("info", "vm_image.sav", env=NO_KVM)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "all checksums verified" in text
    assert "STAR" in text and "LSTAR" in text and "0xc0000082" in text
    assert "cs  selector 0x33" in text
    assert "ay_caramba.txt  O_RDWR|O_CREAT|O_LARGEFILE  mode 0777  offset 16" in text
    assert "Pending call   none" in text
    assert "Next instructions at rip" in text


def test_info_json_has_the_same_data(vmstate, lab_image):
    data = json.loads(vmstate("info", "--json", "vm_image.sav", env=NO_KVM).stdout)
    vcpu = data["vcpus"][0]
    assert vcpu["registers"]["rax"] == "0x0"                 # what syscall(400) returns
    assert vcpu["segments"]["cs"]["selector"] == "0x33"
    assert {"name": "LSTAR", "index": "0xc0000082", "value": "0x4800"} in vcpu["msrs"]
    assert data["files"][3] == {"fd": 3, "kind": "file", "path": "ay_caramba.txt",
                                "flags": "0x8042", "flag_names": "O_RDWR|O_CREAT|O_LARGEFILE",
                                "mode": "0777", "offset": 16}
    assert vcpu["next_instructions"][0]["address"] == vcpu["registers"]["rip"]
    assert data["memory"][0]["present_pages"] > 0


def test_info_reports_corrupt_memory(vmstate, lab_image):
    _corrupt(lab_image, _places(lab_image)["memory"])
    result = vmstate("info", "vm_image.sav", env=NO_KVM)
    assert "fails its checksum" in one_line_error(result)


def test_split_of_corrupt_memory_discards_the_core(vmstate, lab_image, tmp_path):
    """split writes the core while it verifies the image: the core must not survive."""
    _corrupt(lab_image, _places(lab_image)["memory"])
    result = vmstate("split", "vm_image.sav", env=NO_KVM)
    assert result.returncode == 125
    assert "fails its checksum" in one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ay_caramba.txt", "vm_image.sav"]


def test_xsave_area_of_an_odd_size_is_refused_not_copied(vmstate, lab_image, tmp_path):
    """4099 bytes would not fit the ioctl's buffer of 32-bit words: refuse, do not copy."""
    from dataclasses import replace

    from vmstate.image.writer import write_image
    with Image(str(lab_image)) as image:
        vcpu = replace(image.state.vcpus[0], xsave=image.state.vcpus[0].xsave + b"\1\2\3")
        state = replace(image.state, vcpus=(vcpu,))
        write_image(str(tmp_path / "odd.sav"), state, [image.region_view(0)])
    result = vmstate("restore", "odd.sav")
    assert result.returncode == 125
    assert "an XSAVE area of 4099 bytes" in one_line_error(result)
    assert (tmp_path / "ay_caramba.txt").read_bytes() == b"Hello World !!!\n"
