"""The vCPU registers inside QEMU's "cpu" device section, named as vmstate names them
(rax..r15, rip, rflags, segments, gdt/idt, cr0..cr4, efer), and QEMU's derived `hflags`.

QEMU's cpu section keeps the general registers in encoding order (RAX, RCX, RDX, RBX, RSP,
RBP, RSI, RDI, R8..R15) and the segments as ES, CS, SS, DS, FS, GS, each with a raw descriptor
`flags` word that split shows as the fields of a descriptor (type, s, dpl, present, avl, l,
db, g). `hflags` caches facts derived from CR0, CR4, EFER and the segments; QEMU's load trusts
it, so join recomputes those bits after an edit (see `derived_hflags`).
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_SECTION = "cpu"
GP_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")
SEGMENT_NAMES = SEGMENT_ORDER + ("ldt", "tr")
TABLE_NAMES = ("gdt", "idt")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "efer")
REGISTER_NAMES = GP_ORDER + ("rip", "rflags")

# The descriptor bits of QEMU's segment `flags` (the second descriptor word's layout).
DESCRIPTOR_BITS = (("type", 8, 0xF), ("s", 12, 1), ("dpl", 13, 3), ("present", 15, 1),
                   ("avl", 20, 1), ("l", 21, 1), ("db", 22, 1), ("g", 23, 1))
DESCRIPTOR_MASK = 0x00F0FF00


def register_fields() -> dict[str, list[tuple[str, str, str]]]:
    """cpu-section leaf path -> per element (group, name, attribute) in the vCPU view."""
    fields = {"env.regs": [("registers", name, "value") for name in GP_ORDER],
              "env.eip": [("registers", "rip", "value")],
              "env.eflags": [("registers", "rflags", "value")],
              "env.efer": [("control", "efer", "value")]}
    for number in (0, 2, 3, 4):
        fields[f"env.cr[{number}]"] = [("control", f"cr{number}", "value")]
    segments = [(f"env.segs[{i}]", name) for i, name in enumerate(SEGMENT_ORDER)]
    segments += [("env.ldt", "ldt"), ("env.tr", "tr")]
    for path, name in segments:
        for part in ("selector", "base", "limit", "flags"):
            fields[f"{path}.{part}"] = [("segment", name, part)]
    for name in TABLE_NAMES:
        for part in ("base", "limit"):
            fields[f"env.{name}.{part}"] = [("table", name, part)]
    return fields


REGISTER_FIELDS = register_fields()


def split_flags(flags: int) -> dict[str, int]:
    values = {name: flags >> shift & mask for name, shift, mask in DESCRIPTOR_BITS}
    values["other-flags"] = flags & ~DESCRIPTOR_MASK
    return values


def join_flags(values: dict[str, int]) -> int:
    flags = values.get("other-flags", 0)
    for name, shift, mask in DESCRIPTOR_BITS:
        flags |= (values[name] & mask) << shift
    return flags


# -- hflags ------------------------------------------------------------------------------------

HF_CPL = 0x3
HF_CS32, HF_SS32, HF_ADDSEG, HF_PE = 1 << 4, 1 << 5, 1 << 6, 1 << 7
HF_MP_SHIFT = 9                        # MP, EM, TS: CR0 bits 1..3
HF_MP_EM_TS = 0x7 << HF_MP_SHIFT
HF_LMA, HF_CS64, HF_OSFXSR = 1 << 14, 1 << 15, 1 << 22
DERIVED_MASK = HF_CPL | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP_EM_TS | HF_LMA | HF_CS64 \
    | HF_OSFXSR
DESC_L, DESC_B = 1 << 21, 1 << 22
EFLAGS_VM = 1 << 17
EFER_LMA = 1 << 10
CR4_OSFXSR = 1 << 9


@dataclass(frozen=True)
class DerivedInputs:
    cr0: int
    cr4: int
    efer: int
    eflags: int
    cs_flags: int
    ss_flags: int
    segment_bases: int          # ds.base | es.base | ss.base


def derived_hflags(hflags: int, x: DerivedInputs) -> int:
    """`hflags` with the bits QEMU derives from CR0, CR4, EFER and the segments recomputed as
    QEMU's own updates do (cpu_x86_update_cr0/cr4, cpu_x86_load_seg_cache, cpu_post_load)."""
    bits = (x.cr0 & 1) * HF_PE | ((x.cr0 >> 1) & 0x7) << HF_MP_SHIFT
    bits |= HF_LMA if x.efer & EFER_LMA else 0
    bits |= HF_OSFXSR if x.cr4 & CR4_OSFXSR else 0
    bits |= (x.ss_flags >> 13) & HF_CPL
    if x.efer & EFER_LMA and x.cs_flags & DESC_L:
        bits |= HF_CS32 | HF_SS32 | HF_CS64
    else:
        bits |= HF_CS32 if x.cs_flags & DESC_B else 0
        bits |= HF_SS32 if x.ss_flags & DESC_B else 0
        if not x.cr0 & 1 or x.eflags & EFLAGS_VM or not bits & HF_CS32 or x.segment_bases:
            bits |= HF_ADDSEG
    return (hflags & ~DERIVED_MASK) | bits


# -- the view ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VcpuView:
    """One vCPU's registers as <vcpu> shows them: (group, name, attribute) -> value.
    `hflags_derived`: split found QEMU's hflags equal to derived_hflags() of these registers,
    so join may recompute them after an edit."""
    id: int
    values: dict
    hflags_derived: bool


def inputs_of(values: dict) -> DerivedInputs:
    return DerivedInputs(values["control", "cr0", "value"], values["control", "cr4", "value"],
                         values["control", "efer", "value"], values["registers", "rflags", "value"],
                         values["segment", "cs", "flags"], values["segment", "ss", "flags"],
                         values["segment", "ds", "base"] | values["segment", "es", "base"]
                         | values["segment", "ss", "base"])


def view_of(instance: int, fields: dict) -> VcpuView:
    """The view of one cpu section, from its leaves by path (description.leaves)."""
    values = {}
    for path, keys in REGISTER_FIELDS.items():
        leaf = fields.get(path)
        if leaf is None or not leaf.is_integer or leaf.count != len(keys):
            raise KeyError(path)
        values.update(zip(keys, leaf.values()))
    hflags = fields.get("env.hflags")
    if hflags is None:
        raise KeyError("env.hflags")
    (current,) = hflags.values()
    return VcpuView(instance, values, derived_hflags(current, inputs_of(values)) == current)
