"""`vmstate info`: what a VM image holds, as data (for --json) and as text."""

from __future__ import annotations

import capstone

from . import x86, xsave
from .errors import VmstateError
from .image.reader import Image
from .linux import open_flag_names
from .paging import PageTables
from .syscall_names import SYSCALL_NAMES
from .state import GP_REGISTERS, PAGE_SIZE, SEGMENT_REGISTERS, VCPU_EVENT_FIELDS, VcpuState
from .text import escape, from_json_text, json_text
from .units import format_size

RFLAGS_NAMES = [(0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
                (10, "DF"), (11, "OF"), (16, "RF"), (18, "AC"), (21, "ID")]
CR0_NAMES = [(0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"),
             (18, "AM"), (29, "NW"), (30, "CD"), (31, "PG")]
CR4_NAMES = [(0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"),
             (7, "PGE"), (8, "PCE"), (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"),
             (12, "LA57"), (16, "FSGSBASE"), (17, "PCIDE"), (18, "OSXSAVE"), (20, "SMEP"),
             (21, "SMAP")]
EFER_NAMES = [(0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE")]
DISASSEMBLY_BYTES = 64


def hexa(value: int) -> str:
    return f"{value:#x}"


def bit_names(value: int, table) -> list[str]:
    return [name for bit, name in table if value >> bit & 1]


SAVED_BY_NAMES = {"kvm": "KVM (kvm)", "soft": "the software CPU (soft)"}

def describe(image: Image, instructions: int = 8) -> dict:
    """Everything `info` shows, as JSON-ready data (addresses and registers as 0x hex)."""
    state = image.state
    space = state.vmm.address_space
    return {
        "image": {**json_text("path", image.path),
                  "format": f"{image.version[0]}.{image.version[1]}",
                  "file_size": image.file_size, "sections": len(image.sections),
                  "digest": f"{image.digest():#018x}"},
        "program": {**json_text("path", state.vmm.program),
                    "argv": [json_text("value", arg) for arg in state.vmm.argv]},
        "saved_by": state.vmm.saved_by or None,
        "vcpus": [describe_vcpu(image, vcpu, instructions) for vcpu in state.vcpus],
        "memory": [{"guest_phys_addr": hexa(r.guest_phys_addr), "size": r.size,
                    "pages": r.page_count, "present_pages": r.present_pages,
                    "present_bytes": r.present_pages * PAGE_SIZE, "extents": len(r.present.runs),
                    "present_runs": [{"first_page": first, "pages": count}
                                     for first, count in r.present.runs]}
                   for r in state.memory],
        "address_space": {**{name: hexa(getattr(space, name)) for name in
                             ("user_start", "user_end", "brk_start", "brk", "mmap_low",
                              "mmap_top")},
                          "free_ranges": [{"start": hexa(start), "length": hexa(length)}
                                          for start, length in space.free_ranges]},
        "files": [{"fd": f.fd, "kind": f.kind, **json_text("path", f.path),
                   "flags": hexa(f.flags),
                   "flag_names": open_flag_names(f.flags), "mode": f"0{f.mode:o}", "offset": f.offset}
                  for f in state.vmm.files],
        "pending_call": None if state.vmm.pending is None else {
            "nr": state.vmm.pending.nr,
            "name": SYSCALL_NAMES.get(state.vmm.pending.nr, f"syscall_{state.vmm.pending.nr}"),
            "args": [hexa(a) for a in state.vmm.pending.args],
            "rip": hexa(state.vmm.pending.rip), "sleep_left_ns": state.vmm.sleep_left_ns},
        "extra_sections": [{"type": hexa(x.type), "instance": x.instance, "size": len(x.data)}
                           for x in state.extra],
        "os": None if state.vmm.os is None else _describe_os(state.vmm.os),
        "limits": None if state.vmm.limits is None else {
            "max_file_size": state.vmm.limits.max_file_size,
            "max_fds": state.vmm.limits.max_fds,
            "max_processes": state.vmm.limits.max_processes},
    }


def _describe_os(g) -> dict:
    return {
        **json_text("cwd", g.cwd), "umask": f"0{g.umask:03o}", **json_text("hostname", g.hostname),
        "uid": g.uid, "gid": g.gid,
        "descriptors": [{"fd": d.fd, "description": d.description, "cloexec": d.cloexec,
                         "pipe": None if d.pipe < 0 else d.pipe, "flags": hexa(d.flags)}
                        for d in g.descriptors],
        "pipes": [{"id": p.id, "buffered_bytes": len(p.buffered)} for p in g.pipes],
        "signal_actions": [{"signal": a.signal, "handler": hexa(a.handler),
                            "flags": hexa(a.flags), "mask": hexa(a.mask)} for a in g.actions],
        "blocked": hexa(g.blocked), "pending": hexa(g.pending),
        "alarm_ns": g.alarm_ns, "alarm_interval_ns": g.alarm_interval_ns,
        "limits": [{"resource": r, "soft": s, "hard": h} for r, s, h in g.limits],
    }


def describe_vcpu(image: Image, vcpu: VcpuState, instructions: int) -> dict:
    """One vCPU's state as data; `image` is anything with read_phys(addr, length) (an
    Image, or a running VM's memory)."""
    s = vcpu.sregs
    fpu = xsave.decode(vcpu.xsave)
    return {
        "id": vcpu.id,
        "registers": {name: hexa(getattr(vcpu.regs, name)) for name in GP_REGISTERS},
        "rflags_names": bit_names(vcpu.regs.rflags, RFLAGS_NAMES),
        "segments": {name: {k: hexa(v) if k in ("selector", "base", "limit", "type") else v
                            for k, v in vars(getattr(s, name)).items()}
                     for name in SEGMENT_REGISTERS},
        "gdt": {"base": hexa(s.gdt.base), "limit": hexa(s.gdt.limit)},
        "idt": {"base": hexa(s.idt.base), "limit": hexa(s.idt.limit)},
        "control": {"cr0": hexa(s.cr0), "cr0_names": bit_names(s.cr0, CR0_NAMES),
                    "cr2": hexa(s.cr2), "cr3": hexa(s.cr3), "cr4": hexa(s.cr4),
                    "cr4_names": bit_names(s.cr4, CR4_NAMES), "cr8": hexa(s.cr8),
                    "efer": hexa(s.efer), "efer_names": bit_names(s.efer, EFER_NAMES),
                    "apic_base": hexa(s.apic_base)},
        "msrs": [{"name": x86.msr_name(index), "index": hexa(index), "value": hexa(value)}
                 for index, value in vcpu.msrs],
        "fpu": {"fcw": hexa(fpu.fcw), "fsw": hexa(fpu.fsw), "ftw": hexa(fpu.ftw),
                "fop": hexa(fpu.fop), "fip": hexa(fpu.fip), "fdp": hexa(fpu.fdp),
                "mxcsr": hexa(fpu.mxcsr), "mxcsr_mask": hexa(fpu.mxcsr_mask),
                "st": {f"st{i}": "0x" + v[::-1].hex() for i, v in enumerate(fpu.st)},
                "xmm": {f"xmm{i}": "0x" + v[::-1].hex() for i, v in enumerate(fpu.xmm)
                        if any(v)},
                "xsave_bytes": len(vcpu.xsave)},
        "xcrs": {f"xcr{i}": hexa(v) for i, v in vcpu.xcrs},
        "mp_state": vcpu.mp_state,
        "events": {name: getattr(vcpu.events, name) for name in VCPU_EVENT_FIELDS},
        "debug": {name: hexa(getattr(vcpu.debugregs, name))
                  for name in ("db0", "db1", "db2", "db3", "dr6", "dr7", "flags")},
        "cpuid_entries": len(vcpu.cpuid),
        "cpuid": [{name: hexa(getattr(entry, name)) for name in
                   ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
                  for entry in vcpu.cpuid],
        "next_instructions": _disassemble(image, vcpu, instructions),
    }


def _disassemble(image: Image, vcpu: VcpuState, count: int) -> list[dict]:
    s = vcpu.sregs
    rip = vcpu.regs.rip
    try:
        tables = PageTables(image.read_phys, s.cr3, s.cr0, s.cr4, s.efer)
        code = bytearray()
        while len(code) < DISASSEMBLY_BYTES:      # page by page: pages need not be contiguous
            physical = tables.translate(rip + len(code))
            if physical is None:
                break
            chunk = min(DISASSEMBLY_BYTES - len(code), PAGE_SIZE - physical % PAGE_SIZE)
            code += image.read_phys(physical, chunk)
    except VmstateError as e:
        return [{"error": str(e)}]
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [{"address": hexa(insn.address), "bytes": insn.bytes.hex(),
             "text": f"{insn.mnemonic} {insn.op_str}".strip()}
            for insn in disassembler.disasm(bytes(code), rip, count)]


def render_text(info: dict, verified: str) -> str:
    """The human-readable view of `describe`'s data."""
    image, lines = info["image"], []
    add = lines.append
    add(f"VM image {escape(from_json_text(image, 'path'))} (format {image['format']}, "
        f"{format_size(image['file_size'])} apparent size, {image['sections']} sections): {verified}")
    argv = [escape(from_json_text(arg, "value")) for arg in info["program"]["argv"]]
    add(f"Program   {' '.join(argv) or '(unknown)'}")
    if info["saved_by"]:
        add(f"Saved by  {SAVED_BY_NAMES.get(info['saved_by'], escape(info['saved_by']))}")
    for i, region in enumerate(info["memory"]):
        add(f"Memory    region {i}: guest physical {region['guest_phys_addr']}, "
            f"{format_size(region['size'])}, {region['present_pages']} of {region['pages']} pages "
            f"stored ({format_size(region['present_bytes'])}) in {region['extents']} runs")
    space = info["address_space"]
    add(f"Address space  user {space['user_start']}-{space['user_end']}, heap {space['brk_start']}"
        f"-{space['brk']}, mmap area {space['mmap_low']}-{space['mmap_top']}")
    for vcpu in info["vcpus"]:
        lines += [""] + render_vcpu(vcpu)
    add("")
    add("Open files")
    for f in info["files"]:
        where = escape(from_json_text(f, "path")) if f["kind"] == "file" else f"({f['kind']})"
        add(f"  fd {f['fd']:<3} {where}  {f['flag_names']}  mode {f['mode']}  offset {f['offset']}")
    pending = info["pending_call"]
    add("Pending call   " + ("none" if pending is None else
                             f"{pending['name']}({', '.join(pending['args'])}) at rip "
                             f"{pending['rip']}, re-issued on resume"
                             + ("" if pending["sleep_left_ns"] is None else
                                f" ({pending['sleep_left_ns'] / 1e9:.3f} s of its sleep left)")))
    if info["os"] is not None:
        lines += _render_os(info["os"])
    limits = info["limits"]
    if limits is not None:
        size = limits["max_file_size"]
        add(f"Limits         files up to {'any size' if size is None else format_size(size)}  "
            f"{limits['max_fds']} fds  {limits['max_processes']} processes")
    for extra in info["extra_sections"]:
        add(f"Unknown section type {extra['type']} ({extra['size']} bytes), carried through")
    return "\n".join(lines)


def render_vcpu(vcpu: dict, with_msrs: bool = True) -> list[str]:
    regs, c = vcpu["registers"], vcpu["control"]
    lines = [f"vCPU {vcpu['id']}"]
    names = [n for n in regs if n not in ("rip", "rflags")]
    for row in range(0, len(names), 4):
        lines.append("  " + "  ".join(f"{n:>3} {int(regs[n], 16):#018x}" for n in names[row:row + 4]))
    lines.append(f"  rip {int(regs['rip'], 16):#018x}  rflags {regs['rflags']} "
                 f"[{' '.join(vcpu['rflags_names'])}]")
    lines.append("  Segments")
    for name, seg in vcpu["segments"].items():
        flags = " ".join(k for k in ("present", "s", "l", "db", "g", "avl", "unusable") if seg[k])
        lines.append(f"    {name:<3} selector {seg['selector']:<5} base {seg['base']:<10} limit "
                     f"{seg['limit']:<10} type {seg['type']:<4} dpl {seg['dpl']}  {flags}")
    lines.append(f"  gdt base {vcpu['gdt']['base']} limit {vcpu['gdt']['limit']}   "
                 f"idt base {vcpu['idt']['base']} limit {vcpu['idt']['limit']}")
    lines.append(f"  cr0 {c['cr0']} [{' '.join(c['cr0_names'])}]  cr2 {c['cr2']}  cr3 {c['cr3']}  "
                 f"cr4 {c['cr4']} [{' '.join(c['cr4_names'])}]  cr8 {c['cr8']}")
    lines.append(f"  efer {c['efer']} [{' '.join(c['efer_names'])}]  apic_base {c['apic_base']}")
    lines.append(f"  MSRs ({len(vcpu['msrs'])})" + ("" if with_msrs else ": see vmstate info"))
    for msr in vcpu["msrs"] if with_msrs else ():
        lines.append(f"    {msr['name']:<24} {msr['index']:>10}  {int(msr['value'], 16):#018x}")
    fpu = vcpu["fpu"]
    xmm = "  ".join(f"{k} {v}" for k, v in fpu["xmm"].items()) or "all zero"
    lines.append(f"  FPU/SSE  fcw {fpu['fcw']}  fsw {fpu['fsw']}  mxcsr {fpu['mxcsr']}  "
                 f"({fpu['xsave_bytes']}-byte XSAVE area)")
    lines.append(f"    non-zero SSE registers: {xmm}")
    xcrs = "  ".join(f"{k} {v}" for k, v in vcpu["xcrs"].items())
    lines.append(f"  mp_state {vcpu['mp_state']}  {xcrs}  dr6 {vcpu['debug']['dr6']}  "
                 f"dr7 {vcpu['debug']['dr7']}  {vcpu['cpuid_entries']} CPUID entries")
    lines.append(f"  Next instructions at rip {regs['rip']}")
    for insn in vcpu["next_instructions"]:
        if "error" in insn:
            lines.append(f"    (cannot read: {insn['error']})")
        else:
            lines.append(f"    {insn['address']}:  {insn['bytes']:<22} {insn['text']}")
    return lines


def _render_os(g: dict) -> list[str]:
    cwd, hostname = escape(from_json_text(g, "cwd")), escape(from_json_text(g, "hostname"))
    lines = [f"Guest OS       cwd /{cwd.lstrip('.')}  umask {g['umask']}  hostname "
             f"{hostname}  uid {g['uid']} gid {g['gid']}"]
    shared = [d for d in g["descriptors"] if d["description"] != d["fd"]]
    for d in shared:
        lines.append(f"  fd {d['fd']} shares the open-file description of fd {d['description']}")
    cloexec = [str(d["fd"]) for d in g["descriptors"] if d["cloexec"]]
    if cloexec:
        lines.append(f"  close-on-exec fds {', '.join(cloexec)}")
    for pipe in g["pipes"]:
        ends = ", ".join(f"fd {d['fd']}" for d in g["descriptors"] if d["pipe"] == pipe["id"])
        lines.append(f"  pipe {pipe['id']} ({ends}): {pipe['buffered_bytes']} bytes buffered")
    for action in g["signal_actions"]:
        lines.append(f"  signal {action['signal']}: handler {action['handler']} flags "
                     f"{action['flags']} mask {action['mask']}")
    lines.append(f"  signals blocked {g['blocked']}  pending {g['pending']}"
                 + (f"  alarm in {g['alarm_ns'] / 1e9:.3f} s" if g["alarm_ns"] else ""))
    for limit in g["limits"]:
        lines.append(f"  limit {limit['resource']}: soft {limit['soft']} hard {limit['hard']}")
    return lines
