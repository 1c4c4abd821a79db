"""join(split(image)) is the image again, byte for byte, for generated images (no KVM)."""

from dataclasses import replace

from hypothesis import HealthCheck, given, settings

from strategies import memory_views, sample_state, vm_states
from vmstate import x86
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
