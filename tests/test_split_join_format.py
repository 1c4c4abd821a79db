"""join(split(image)) is the image again, byte for byte, for generated images (no KVM)."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from strategies import LAYOUTS, layout_state, memory_views, restorable_sample_state, vm_states
from vmstate import x86
from vmstate.core import DIRECT_MAP_BASE, Core
from vmstate.image.reader import Image
from vmstate.state import PAGE_SIZE
from vmstate.image.writer import write_image
from vmstate.join import join
from vmstate.pages import PageSet
from vmstate.state import AddressSpace, MemoryRegion
from vmstate.validate import USER_START
from vmstate.split import split


MACHINE_MEMORY = 4 << 20          # the smallest memory this VMM restores


def runnable(state, contents):
    """The generated state and memory, changed just enough to pass join's checks (what
    restore accepts): one vCPU in long mode, one region of 4 MiB at guest physical 0, the
    address space moved above USER_START."""
    vcpu = state.vcpus[0]
    s = vcpu.sregs
    sregs = replace(s, cr0=s.cr0 | x86.CR0_PE | x86.CR0_PG,
                    cr4=(s.cr4 | x86.CR4_PAE) & ~x86.CR4_LA57,
                    efer=s.efer | x86.EFER_LME | x86.EFER_LMA)
    vcpu = replace(vcpu, id=0, sregs=sregs,
                   regs=replace(vcpu.regs, rip=vcpu.regs.rip & 0x7FFF_FFFF_FFFF))
    pending = state.vmm.pending
    if pending is not None:
        pending = replace(pending, rip=pending.rip & 0x7FFF_FFFF_FFFF)
        vcpu = replace(vcpu, regs=replace(vcpu.regs, rip=pending.rip, rax=pending.nr))
    region = MemoryRegion(0, MACHINE_MEMORY, PageSet.from_runs(state.memory[0].present.runs,
                                                               MACHINE_MEMORY // PAGE_SIZE))
    a = state.vmm.address_space
    if USER_START + a.user_end <= MACHINE_MEMORY:
        space = AddressSpace(*(USER_START + value for value in (
            a.user_start, a.user_end, a.brk_start, a.brk, a.mmap_low, a.mmap_top)),
            free_ranges=tuple((USER_START + start, length) for start, length in a.free_ranges))
    else:                   # laid out over a second region this VMM does not have
        space = AddressSpace(USER_START, MACHINE_MEMORY, USER_START, USER_START,
                             MACHINE_MEMORY, MACHINE_MEMORY)
    vmm = replace(state.vmm, pending=pending, address_space=space)
    return (replace(state, vcpus=(vcpu,), memory=(region,), vmm=vmm),
            [contents[0].ljust(MACHINE_MEMORY, b"\0")])


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


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(generated=vm_states())
def test_join_of_split_is_byte_identical(tmp_path, generated):
    state, contents = generated
    round_trip(tmp_path, *runnable(state, contents))


def test_sample_state_round_trip(tmp_path):
    round_trip(tmp_path, *restorable_sample_state())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_and_one_patched_page_on_every_layout(tmp_path, layout):
    """Fragmented memory (thousands of runs) splits and joins byte for byte, and a byte
    patched in the core is reported as exactly its page, and lands in the new image."""
    state, contents = layout_state(layout)
    round_trip(tmp_path, state, contents)
    runs = state.memory[0].present.runs
    first, count = runs[len(runs) // 2]
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
