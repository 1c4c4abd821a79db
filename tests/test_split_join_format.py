"""join(split(image)) is the image again, byte for byte, for generated images (no KVM)."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from strategies import LAYOUTS, layout_state, memory_views, sample_state, vm_states
from vmstate import x86
from vmstate.core import DIRECT_MAP_BASE, Core
from vmstate.image.reader import Image
from vmstate.state import PAGE_SIZE
from vmstate.image.writer import write_image
from vmstate.join import join
from vmstate.split import split


def runnable(state):
    """The generated state, changed just enough to pass join's checks."""
    vcpus = []
    for vcpu in state.vcpus:
        s = vcpu.sregs
        sregs = replace(s, cr0=s.cr0 | x86.CR0_PE | x86.CR0_PG,
                        cr4=(s.cr4 | x86.CR4_PAE) & ~x86.CR4_LA57,
                        efer=s.efer | x86.EFER_LME | x86.EFER_LMA)
        xsave = vcpu.xsave.ljust(576, b"\0") if vcpu.xsave else b""
        vcpus.append(replace(vcpu, sregs=sregs, xsave=xsave + bytes(-len(xsave) % 4),
                             regs=replace(vcpu.regs, rip=vcpu.regs.rip & 0x7FFF_FFFF_FFFF)))
    pending = state.vmm.pending
    if pending is not None:
        pending = replace(pending, rip=pending.rip & 0x7FFF_FFFF_FFFF)
        vcpus[0] = replace(vcpus[0], regs=replace(vcpus[0].regs, rip=pending.rip, rax=pending.nr))
    return replace(state, vcpus=tuple(vcpus), vmm=replace(state.vmm, pending=pending))


def round_trip(tmp_path, state, contents):
    image = tmp_path / "image.sav"
    write_image(str(image), state, memory_views(contents))
    split(str(image), str(tmp_path / "vm.core"), str(tmp_path / "hw.xml"))
    xml = (tmp_path / "hw.xml").read_bytes()
    result, joined = join(str(tmp_path / "vm.core"), str(tmp_path / "hw.xml"), xml)
    try:
        assert result.field_changes == [] and result.page_changes == []
        joined.write(str(tmp_path / "again.sav"))
    finally:
        joined.close()
    assert (tmp_path / "again.sav").read_bytes() == image.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(generated=vm_states())
def test_join_of_split_is_byte_identical(tmp_path, generated):
    state, contents = generated
    round_trip(tmp_path, runnable(state), contents)


def test_sample_state_round_trip(tmp_path):
    state, contents = sample_state()
    round_trip(tmp_path, runnable(state), contents)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_and_one_patched_page_on_every_layout(tmp_path, layout):
    """Fragmented memory (thousands of runs) splits and joins byte for byte, and a byte
    patched in the core is reported as exactly its page, and lands in the new image."""
    state, contents = layout_state(layout)
    state = runnable(state)
    round_trip(tmp_path, state, contents)
    first, count = state.memory[0].present[len(state.memory[0].present) // 2]
    page = first + count - 1
    with Core(str(tmp_path / "vm.core")) as core:
        offset = next(s.offset for s in core.segments if s.vaddr == DIRECT_MAP_BASE)
    with open(tmp_path / "vm.core", "r+b") as f:
        f.seek(offset + page * PAGE_SIZE + 100)
        f.write(b"\xee")
    xml = (tmp_path / "hw.xml").read_bytes()
    result, joined = join(str(tmp_path / "vm.core"), str(tmp_path / "hw.xml"), xml)
    try:
        assert [(c.physical, c.kind) for c in result.page_changes] == \
            [(page * PAGE_SIZE, "changed")]
        joined.write(str(tmp_path / "patched.sav"))
    finally:
        joined.close()
    with Image(str(tmp_path / "patched.sav")) as image:
        image.verify_memory()
        assert image.state.memory == state.memory
        assert image.read_phys(page * PAGE_SIZE + 100, 1) == b"\xee"
