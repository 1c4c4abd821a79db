"""vmstate's own image format (vmstate.image) in the registry: the existing reader, split,
join and info, wrapped; `read` maps the image's KVM-shaped state onto the shared model."""

from __future__ import annotations

from .model import ArchSegment, ArchVcpu, Machine, MemoryBlock

SEGMENT_ATTRIBUTES = ("type", "s", "dpl", "present", "avl", "l", "db", "g")


def read(path: str) -> Machine:
    from ..image.reader import Image
    from ..state import GP_REGISTERS, SEGMENT_REGISTERS
    with Image(path) as image:
        state = image.state
    vcpus = []
    for vcpu in state.vcpus:
        s = vcpu.sregs
        segments = {name: ArchSegment(getattr(s, name).selector, getattr(s, name).base,
                                      getattr(s, name).limit,
                                      {a: getattr(getattr(s, name), a)
                                       for a in SEGMENT_ATTRIBUTES})
                    for name in SEGMENT_REGISTERS}
        vcpus.append(ArchVcpu(vcpu.id, {n: getattr(vcpu.regs, n) for n in GP_REGISTERS},
                              segments, {"gdt": (s.gdt.base, s.gdt.limit),
                                         "idt": (s.idt.base, s.idt.limit)},
                              {n: getattr(s, n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8",
                                                          "efer", "apic_base")}))
    memory = tuple(MemoryBlock(f"ram@{r.guest_phys_addr:#x}", r.size,
                               ((0, r.guest_phys_addr, r.size),), r.present_pages)
                   for r in state.memory)
    return Machine("vmstate-image", path, "vmstate-kvm", tuple(vcpus), memory, ())


def info(path: str, as_json: bool, instructions: int = 8) -> str:
    import json

    from ..image.reader import Image
    from ..info import describe, render_text
    with Image(path) as image:
        image.verify_memory()
        data = describe(image, instructions)
    return json.dumps(data, indent=2) if as_json else render_text(data, "all checksums verified")


def split(path: str, core: str, xml: str) -> str:
    from ..split import split as split_image
    from ..units import format_size
    result = split_image(path, core, xml)
    return (f"wrote {core} ({len(result.core.segments)} memory segments, "
            f"{format_size(result.core.file_size)} apparent size) and {xml} "
            f"({format_size(result.xml_bytes)})")


def join(core: str, xml: str, xml_data: bytes, output: str | None, symbols) -> str:
    from ..join import join as join_parts, render_summary
    result, joined = join_parts(core, xml, xml_data)
    try:
        summary = render_summary(result, symbols)
        if output is not None:
            joined.write(output)
    finally:
        joined.close()
    return summary
