"""Checks that a VM state can run: what join refuses to write and restore refuses to start.
Each problem names where in the hardware state it is (an XPath into the XML)."""

from __future__ import annotations

from dataclasses import dataclass

from . import x86, xsave
from .rootfs import normalize_guest_path
from .state import FD_FILE, VmState


XSAVE_MIN = xsave.XSAVE_HEADER_OFFSET + xsave.XSAVE_HEADER_SIZE    # legacy region + header
XSAVE_MAX = 1 << 16                                                 # far above any CPU's size
MAX_XCRS = 16                           # what struct kvm_xcrs holds


@dataclass(frozen=True)
class Problem:
    xpath: str          # where in the hardware XML, e.g. /vmstate-hardware/vcpu[@id='0']/...
    message: str


def problems(state: VmState) -> list[Problem]:
    found = []
    for vcpu in state.vcpus:
        at = f"/vmstate-hardware/vcpu[@id='{vcpu.id}']"
        regs, s = vcpu.regs, vcpu.sregs
        if not x86.is_canonical(regs.rip):
            found.append(Problem(f"{at}/registers/reg[@name='rip']",
                                 f"vCPU {vcpu.id}: rip {regs.rip:#x} is not a canonical address"))
        found += [Problem(f"{at}/control/reg[@name='{name}']", f"vCPU {vcpu.id}: {message}")
                  for name, message in _long_mode_problems(s.cr0, s.cr4, s.efer)]
        if len(vcpu.xcrs) > MAX_XCRS:
            found.append(Problem(f"{at}/xcrs", f"vCPU {vcpu.id}: {len(vcpu.xcrs)} XCRs (KVM holds "
                                 f"at most {MAX_XCRS})"))
        if vcpu.xsave and (len(vcpu.xsave) % 4 or not XSAVE_MIN <= len(vcpu.xsave) <= XSAVE_MAX):
            found.append(Problem(f"{at}/xsave-rest", f"vCPU {vcpu.id}: an XSAVE area of "
                                 f"{len(vcpu.xsave)} bytes (expected {XSAVE_MIN} to {XSAVE_MAX} "
                                 "bytes, a multiple of 4)"))
    pending = state.vmm.pending
    if pending is not None and state.vcpus:
        regs = state.vcpus[0].regs
        if (regs.rip, regs.rax) != (pending.rip, pending.nr):
            found.append(Problem("/vmstate-hardware/vmm/pending-call",
                                 f"the pending call (syscall {pending.nr} at {pending.rip:#x}) "
                                 f"does not match the registers (rax {regs.rax:#x}, rip "
                                 f"{regs.rip:#x}): the guest would not re-issue it"))
    for f in state.vmm.files:
        if f.kind == FD_FILE and not is_inside_root(f.path):
            found.append(Problem(f"/vmstate-hardware/vmm/files/fd[@number='{f.fd}']",
                                 f"guest fd {f.fd}: path {f.path!r} is outside the guest root "
                                 "(use a relative path without '..')"))
    return found + _os_problems(state)


def _os_problems(state: VmState) -> list[Problem]:
    """The vmm-os section agrees with the file table: every descriptor is a file table entry
    or a pipe end (not both), every pipe end names a pipe, the cwd lies inside the root."""
    g = state.vmm.os
    if g is None:
        return []
    at = "/vmstate-hardware/vmm/os"
    found = []
    if not is_inside_root(g.cwd):
        found.append(Problem(f"{at}", f"cwd {g.cwd!r} is outside the guest root"))
    files = {f.fd for f in state.vmm.files}
    pipes = {p.id for p in g.pipes}
    seen = set()
    for d in g.descriptors:
        where = f"{at}/descriptor[@fd='{d.fd}']"
        if d.fd in seen or d.fd < 0:
            found.append(Problem(where, f"descriptor {d.fd} appears twice or is negative"))
        seen.add(d.fd)
        if d.pipe >= 0 and (d.pipe not in pipes or d.fd in files):
            found.append(Problem(where, f"guest fd {d.fd}: pipe {d.pipe} is not in the image, "
                                 "or the fd is also in the file table"))
        if d.pipe < 0 and d.fd not in files:
            found.append(Problem(where, f"guest fd {d.fd} is neither a file nor a pipe end"))
    return found


def _long_mode_problems(cr0: int, cr4: int, efer: int) -> list[tuple[str, str]]:
    """(register, reason) for each reason the vCPU cannot execute in 64-bit long mode."""
    out = []
    if not cr0 & x86.CR0_PG or not cr0 & x86.CR0_PE:
        out.append(("cr0", f"cr0 {cr0:#x} lacks PE or PG: long mode needs paging"))
    if not cr4 & x86.CR4_PAE:
        out.append(("cr4", f"cr4 {cr4:#x} lacks PAE: long mode needs PAE paging"))
    if cr4 & x86.CR4_LA57:
        out.append(("cr4", f"cr4 {cr4:#x} sets LA57: 5-level paging is not supported"))
    if not efer & x86.EFER_LME or not efer & x86.EFER_LMA:
        out.append(("efer", f"efer {efer:#x} lacks LME or LMA: the vCPU would not be in long mode"))
    return out


def is_inside_root(path: str) -> bool:
    """A path as the VMM records it: normalized, relative, at or below the guest root."""
    try:
        return bool(path) and "\0" not in path and normalize_guest_path(path) == path
    except OSError:
        return False
