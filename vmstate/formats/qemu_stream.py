"""The QEMU 7.2 migration stream format in the registry (code in vmstate.qemu)."""

from __future__ import annotations

import json

from .model import ArchSegment, ArchVcpu, Device, Machine, MemoryBlock


def read(path: str) -> Machine:
    from ..qemu import cpu
    from ..qemu.description import leaves
    from ..qemu.machine import placements
    from ..qemu.split import vcpu_views
    from ..qemu.statexml import format_leaf
    from ..qemu.stream import open_stream
    with open_stream(path) as stream:
        stored = [0] * len(stream.blocks)
        for section in stream.sections:
            for run in section.runs:
                if not run.zero:
                    stored[run.block] += run.count
        memory = tuple(MemoryBlock(b.name, b.size, tuple((p.offset, p.address, p.length) for p in
                                                         placements(stream.machine, b)), n)
                       for b, n in zip(stream.blocks, stored))
        vcpus = tuple(_vcpu(view, cpu) for view in vcpu_views(stream))
        devices = tuple(Device(s.name, s.instance, s.version,
                               tuple((p, format_leaf(leaf)) for p, leaf in leaves(s.device)))
                        for s in stream.device_sections())
        return Machine("qemu-stream", path, stream.machine, vcpus, memory, devices)


def _vcpu(view, cpu) -> ArchVcpu:
    v = view.values
    segments = {name: ArchSegment(v["segment", name, "selector"], v["segment", name, "base"],
                                  v["segment", name, "limit"],
                                  cpu.split_flags(v["segment", name, "flags"]))
                for name in cpu.SEGMENT_NAMES}
    return ArchVcpu(view.id, {n: v["registers", n, "value"] for n in cpu.REGISTER_NAMES},
                    segments, {n: (v["table", n, "base"], v["table", n, "limit"])
                               for n in cpu.TABLE_NAMES},
                    {n: v["control", n, "value"] for n in cpu.CONTROL_NAMES})


def info(path: str, as_json: bool, instructions: int = 0) -> str:
    from .describe import describe_machine, render_machine
    data = describe_machine(read(path))
    return json.dumps(data, indent=2) if as_json else render_machine(data)


def split(path: str, core: str, xml: str) -> str:
    from ..qemu.split import split_stream
    return split_stream(path, core, xml)


def join(core: str, xml: str, xml_data: bytes, output: str | None, symbols) -> str:
    from ..qemu.join import join_stream
    return join_stream(core, xml, xml_data, output, symbols)
