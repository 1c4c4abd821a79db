"""`vmstate info` for any format, from the shared model: machine, vCPU registers, memory
blocks, devices."""

from __future__ import annotations

from ..units import format_size
from .model import Machine


def describe_machine(machine: Machine) -> dict:
    return {
        "file": {"path": machine.path, "format": machine.format,
                 "machine": machine.machine_type},
        "vcpus": [{"id": v.id,
                   "registers": {k: hex(x) for k, x in v.registers.items()},
                   "segments": {k: {"selector": hex(s.selector), "base": hex(s.base),
                                    "limit": hex(s.limit),
                                    **{a: hex(x) for a, x in s.attributes.items()}}
                                for k, s in v.segments.items()},
                   "tables": {k: {"base": hex(b), "limit": hex(lim)}
                              for k, (b, lim) in v.tables.items()},
                   "control": {k: hex(x) for k, x in v.control.items()}}
                  for v in machine.vcpus],
        "memory": [{"name": m.name, "size": m.size, "stored_pages": m.stored_pages,
                    "guest_physical": [{"offset": hex(o), "address": hex(a), "length": hex(n)}
                                       for o, a, n in m.placements]}
                   for m in machine.memory],
        "devices": [{"name": d.name, "instance": d.instance, "version": d.version,
                     "fields": dict(d.fields)} for d in machine.devices],
    }


def render_machine(data: dict) -> str:
    f = data["file"]
    total = sum(m["size"] for m in data["memory"])
    lines = [f"{f['path']}: {f['format']}, machine {f['machine']}, {len(data['vcpus'])} vCPU(s), "
             f"{len(data['devices'])} device sections, {len(data['memory'])} RAM blocks "
             f"({format_size(total)})"]
    for vcpu in data["vcpus"]:
        lines.append(f"vCPU {vcpu['id']}:")
        regs = list(vcpu["registers"].items())
        for i in range(0, len(regs), 6):
            lines.append("  " + "  ".join(f"{k}={v}" for k, v in regs[i:i + 6]))
        lines.append("  " + "  ".join(f"{k}={v}" for k, v in vcpu["control"].items()))
        for name, s in vcpu["segments"].items():
            lines.append(f"  {name:3} selector={s['selector']} base={s['base']} "
                         f"limit={s['limit']} type={s['type']} dpl={s['dpl']} "
                         f"present={s['present']} db={s['db']} l={s['l']}")
        for name, t in vcpu["tables"].items():
            lines.append(f"  {name} base={t['base']} limit={t['limit']}")
    lines.append("RAM blocks:")
    for m in data["memory"]:
        where = ", ".join(f"guest physical {p['address']} ({format_size(int(p['length'], 16))})"
                          for p in m["guest_physical"]) or "no guest physical address"
        lines.append(f"  {m['name']}: {format_size(m['size'])}, {m['stored_pages']} pages stored; "
                     f"{where}")
    lines.append("devices:")
    for d in data["devices"]:
        name = d["name"] if d["instance"] == 0 else f"{d['name']}[{d['instance']}]"
        lines.append(f"  {name} (version {d['version']}, {len(d['fields'])} fields)")
    return "\n".join(lines)
