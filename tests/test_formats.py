"""The format registry: each saved VM is recognised by its magic and read into the one shared
model (architectural vCPUs, named memory blocks, devices); unknown files are refused."""

from __future__ import annotations

import json

import pytest

from helpers import one_line_error
from vmstate.errors import FormatError
from vmstate.formats.registry import detect


@pytest.mark.kvm
def test_a_vmstate_image_reads_into_the_shared_model(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    image = tmp_path / "vm_image.sav"
    chosen = detect(str(image))
    assert chosen.name == "vmstate-image"
    machine = chosen.read(str(image))
    info = json.loads(vmstate("info", "--json", image).stdout)
    vcpu = machine.vcpus[0]
    assert hex(vcpu.registers["rip"]) == hex(int(info["vcpus"][0]["registers"]["rip"], 16))
    assert vcpu.segments["cs"].attributes["l"] == 1            # 64-bit code
    assert vcpu.control["efer"] & 0x400                        # long mode active
    assert sum(block.size for block in machine.memory) == 64 << 20


def test_unknown_files_are_refused_by_magic(vmstate, tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"ELF? no, junk" * 10)
    with pytest.raises(FormatError, match="unknown magic"):
        detect(str(tmp_path / "junk.bin"))
    for command in ("info", "split"):
        line = one_line_error(vmstate(command, "junk.bin"))
        assert "offset 0x0: unknown magic" in line
    assert not (tmp_path / "vm.core").exists()
