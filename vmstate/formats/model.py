"""The state model every format reads into: architectural vCPU state, named memory blocks and
devices as named fields. Nothing here follows one hypervisor's structures; each format maps
its own layout onto it (vmstate images from KVM's, QEMU streams from QEMU's vmstate)."""

from __future__ import annotations

from ..record import record


@record
class ArchSegment:
    selector: int
    base: int
    limit: int
    attributes: dict            # type, s, dpl, present, avl, l, db, g (descriptor fields)


@record
class ArchVcpu:
    """x86-64 architectural registers, named as in the hardware XML of either format."""
    id: int
    registers: dict             # rax..r15, rip, rflags
    segments: dict              # cs, ds, es, fs, gs, ss, ldt, tr -> ArchSegment
    tables: dict                # gdt, idt -> (base, limit)
    control: dict               # cr0, cr2, cr3, cr4, efer (and more where a format has them)


@record
class MemoryBlock:
    """A named block of guest memory; `placements` are (offset in block, guest physical
    address, length) where the block is seen in guest physical memory (none for ROM blobs)."""
    name: str
    size: int
    placements: tuple = ()
    stored_pages: int = 0       # pages the file holds bytes for (the rest read as zero)


@record
class Device:
    name: str
    instance: int
    version: int
    fields: tuple = ()     # (dotted path, value as text)


@record
class Machine:
    format: str
    path: str
    machine_type: str
    vcpus: tuple
    memory: tuple
    devices: tuple
