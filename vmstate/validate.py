"""What a restorable VM state is: the one set of checks the image reader, join and restore
share. Each problem says where in the hardware XML it is (an XPath, and the attribute whose
value is refused), so join can name the element and value.

Two levels:
- `problems`: what any state must satisfy to be an image at all (the reader refuses an image
  that fails them; join refuses to write one): distinct MSR and XCR indexes, a sane XSAVE
  area, extra sections that may be skipped, a file table the VMM can rebuild, an address
  space inside guest memory.
- `restore_problems`: those, plus what this VMM's machine runs (one vCPU in 64-bit long mode,
  one memory region at guest physical 0, user memory above USER_START). join and restore
  refuse a state that fails them, so join never writes an image restore refuses.
"""

from __future__ import annotations

from collections import Counter

from . import x86, xsave
from .image import layout as L
from .record import record
from .rootfs import MODE_BITS, normalize_guest_path
from .state import FD_FILE, PAGE_SIZE, VcpuState, VmState

XSAVE_MIN = xsave.XSAVE_HEADER_OFFSET + xsave.XSAVE_HEADER_SIZE    # legacy region + header
XSAVE_MAX = 1 << 16                                                 # far above any CPU's size
MAX_XCRS = 16                           # what struct kvm_xcrs holds
MAX_GUEST_FDS = 1 << 20                 # the largest --max-fds: guest fds below it
MIN_GUEST_FDS = 3                       # the smallest --max-fds: the standard streams
MAX_GUEST_PROCESSES = 1 << 15           # the largest --max-processes (Linux's default pid_max)
MAX_FILE_OFFSET = (1 << 63) - 1         # off_t
SLEEP_CALLS = (35, 230)                 # nanosleep, clock_nanosleep: may have a time left

# This VMM's machine (machine.layout lays memory out by these).
USER_START = 0x200000                   # user memory begins above the page tables and stubs
MIN_MEMORY, MAX_MEMORY = 8 << 20, 64 << 30   # what `--memory` and a host's `memory` accept
LARGE_PAGE = 2 << 20                    # guest memory is mapped with 2 MiB pages
VCPU_COUNT = 1

ROOT = "/vmstate-hardware"
VMM = f"{ROOT}/vmm"
SPACE = f"{VMM}/address-space"


@record
class Problem:
    xpath: str          # where in the hardware XML, e.g. /vmstate-hardware/vcpu[@id='0']/...
    message: str
    attribute: str = ""     # the attribute of that element whose value is refused


def problems(state: VmState) -> list[Problem]:
    """Why `state` cannot be an image; [] if it can."""
    found = []
    for vcpu in state.vcpus:
        found += _vcpu_problems(vcpu)
    found += _extra_problems(state)
    found += _file_problems(state)
    found += _address_space_problems(state)
    found += _os_problems(state)
    found += _limit_problems(state)
    found += _sleep_problems(state)
    return found


def restore_problems(state: VmState) -> list[Problem]:
    """Why this VMM cannot restore `state`; [] if it can."""
    return problems(state) + _machine_problems(state)


def _vcpu_problems(vcpu: VcpuState) -> list[Problem]:
    at = f"{ROOT}/vcpu[@id='{vcpu.id}']"
    found = []
    for what, pairs, tag in (("MSR", vcpu.msrs, "msrs/msr"), ("XCR", vcpu.xcrs, "xcrs/xcr")):
        for index, times in Counter(index for index, _ in pairs).items():
            if times > 1:
                shown = f"{index:#x}" if what == "MSR" else str(index)
                found.append(Problem(f"{at}/{tag}[{_nth(pairs, index)}]",
                                     f"vCPU {vcpu.id}: {what} {shown} appears {times} times "
                                     "(each at most once)", "index"))
    if len(vcpu.xcrs) > MAX_XCRS:
        found.append(Problem(f"{at}/xcrs", f"vCPU {vcpu.id}: {len(vcpu.xcrs)} XCRs (KVM holds "
                             f"at most {MAX_XCRS})"))
    if vcpu.xsave and (len(vcpu.xsave) % 4 or not XSAVE_MIN <= len(vcpu.xsave) <= XSAVE_MAX):
        found.append(Problem(f"{at}/xsave-rest", f"vCPU {vcpu.id}: an XSAVE area of "
                             f"{len(vcpu.xsave)} bytes (expected {XSAVE_MIN} to {XSAVE_MAX} "
                             "bytes, a multiple of 4)", "size"))
    return found


def _nth(pairs, index: int) -> int:
    """XPath position (1-based) of the second element with `index` among `pairs`."""
    positions = [i for i, (key, _) in enumerate(pairs, 1) if key == index]
    return positions[1]


def _extra_problems(state: VmState) -> list[Problem]:
    found = []
    for position, section in enumerate(state.extra, 1):
        at = f"{ROOT}/extra-section[{position}]"
        if section.type in L.SECTION_NAMES:
            found.append(Problem(at, f"extra section of type {section.type:#06x} is the known "
                                 f"section {L.SECTION_NAMES[section.type]}, not an extra one",
                                 "type"))
        elif section.flags != L.SECTION_OPTIONAL:
            found.append(Problem(at, f"extra section of type {section.type:#06x} has flags "
                                 f"{section.flags:#x}: an unknown section must be optional "
                                 f"(flags {L.SECTION_OPTIONAL:#x}), or no reader can skip it",
                                 "flags"))
    return found


def _file_problems(state: VmState) -> list[Problem]:
    found = []
    numbers = Counter(f.fd for f in state.vmm.files)
    for f in state.vmm.files:
        at = f"{VMM}/files/fd[@number='{f.fd}']"
        if not 0 <= f.fd < MAX_GUEST_FDS:
            found.append(Problem(at, f"guest fd {f.fd} is out of range (0 to "
                                 f"{MAX_GUEST_FDS - 1})", "number"))
        elif numbers[f.fd] > 1:
            found.append(Problem(at, f"guest fd {f.fd} appears {numbers[f.fd]} times", "number"))
        if f.kind == FD_FILE and not is_inside_root(f.path):
            found.append(Problem(at, f"guest fd {f.fd}: path {f.path!r} is outside the guest "
                                 "root (use a relative path without '..')", "path"))
        if not 0 <= f.offset <= MAX_FILE_OFFSET:
            found.append(Problem(at, f"guest fd {f.fd}: offset {f.offset} is beyond the "
                                 f"largest file offset ({MAX_FILE_OFFSET})", "offset"))
        if f.mode & ~MODE_BITS:
            found.append(Problem(at, f"guest fd {f.fd}: mode 0{f.mode:o} has set-uid, set-gid, "
                                 f"sticky or unknown bits (at most 0{MODE_BITS:o})", "mode"))
    return found


def _address_space_problems(state: VmState) -> list[Problem]:
    """The layout UserAddressSpace keeps: user_start <= brk_start <= brk <= mmap_low <=
    mmap_top <= user_end <= the end of guest memory; freed ranges page-aligned, sorted,
    disjoint, inside the mmap area."""
    a = state.vmm.address_space
    memory_end = max((r.guest_phys_addr + r.size for r in state.memory), default=0)
    order = (("user_start", a.user_start), ("brk_start", a.brk_start), ("brk", a.brk),
             ("mmap_low", a.mmap_low), ("mmap_top", a.mmap_top), ("user_end", a.user_end))
    found = []
    for (low_name, low), (high_name, high) in zip(order, order[1:]):
        if low > high:
            found.append(Problem(SPACE, f"address space: {low_name} {low:#x} is above "
                                 f"{high_name} {high:#x}", low_name.replace("_", "-")))
    if state.memory and a.user_end > memory_end:    # no regions: memory comes apart (live)
        found.append(Problem(SPACE, f"address space: user_end {a.user_end:#x} is beyond guest "
                             f"memory (which ends at {memory_end:#x})", "user-end"))
    previous_end = a.mmap_low
    for position, (start, length) in enumerate(a.free_ranges, 1):
        if start % PAGE_SIZE or length % PAGE_SIZE or not length \
                or start < previous_end or start + length > a.mmap_top:
            found.append(Problem(f"{SPACE}/free[{position}]",
                                 f"address space: free range {start:#x}+{length:#x} is not "
                                 "whole pages inside the mmap area "
                                 f"({a.mmap_low:#x}-{a.mmap_top:#x}), after the previous one",
                                 "start"))
            break
        previous_end = start + length
    return found


def _machine_problems(state: VmState) -> list[Problem]:
    found = []
    if len(state.vcpus) != VCPU_COUNT:
        found.append(Problem(f"{ROOT}/vcpu[{min(len(state.vcpus), 2) or 1}]",
                             f"{len(state.vcpus)} vCPUs: this VMM restores {VCPU_COUNT}", "id"))
    if len(state.memory) != 1:
        found.append(Problem(f"{ROOT}/memory", f"{len(state.memory)} memory regions: this VMM "
                             "restores one"))
    else:
        region = state.memory[0]
        if region.guest_phys_addr != 0 or region.size % LARGE_PAGE \
                or not USER_START < region.size <= MAX_MEMORY:
            found.append(Problem(f"{ROOT}/memory/region[1]", f"memory region "
                                 f"{region.guest_phys_addr:#x}+{region.size:#x} does not fit "
                                 f"this VMM (at 0, a multiple of 2 MiB, at most {MAX_MEMORY:#x})",
                                 "size"))
    if state.vmm.address_space.user_start < USER_START:
        found.append(Problem(SPACE, f"address space: user_start "
                             f"{state.vmm.address_space.user_start:#x} is below this VMM's user "
                             f"memory ({USER_START:#x})", "user-start"))
    for vcpu in state.vcpus:
        at = f"{ROOT}/vcpu[@id='{vcpu.id}']"
        regs, s = vcpu.regs, vcpu.sregs
        if not x86.is_canonical(regs.rip):
            found.append(Problem(f"{at}/registers/reg[@name='rip']",
                                 f"vCPU {vcpu.id}: rip {regs.rip:#x} is not a canonical address",
                                 "value"))
        found += [Problem(f"{at}/control/reg[@name='{name}']", f"vCPU {vcpu.id}: {message}",
                          "value")
                  for name, message in _long_mode_problems(s.cr0, s.cr4, s.efer)]
    pending = state.vmm.pending
    if pending is not None and state.vcpus:
        regs = state.vcpus[0].regs
        if (regs.rip, regs.rax) != (pending.rip, pending.nr):
            found.append(Problem(f"{VMM}/pending-call",
                                 f"the pending call (syscall {pending.nr} at {pending.rip:#x}) "
                                 f"does not match the registers (rax {regs.rax:#x}, rip "
                                 f"{regs.rip:#x}): the guest would not re-issue it", "nr"))
    return found


def _os_problems(state: VmState) -> list[Problem]:
    """The vmm-os section agrees with the file table: every descriptor is a file table entry
    or a pipe end (not both), every pipe end names a pipe, the cwd lies inside the root; the
    umask and the pipes' contents are within what the image format holds."""
    g = state.vmm.os
    if g is None:
        return []
    at = f"{VMM}/os"
    found = []
    if not is_inside_root(g.cwd):
        found.append(Problem(f"{at}", f"cwd {g.cwd!r} is outside the guest root"))
    if g.umask > 0o777:
        found.append(Problem(f"{at}", f"umask {g.umask:#o} has bits beyond 0777", "umask"))
    for p in g.pipes:
        if len(p.buffered) > L.MAX_PIPE_BYTES:
            found.append(Problem(f"{at}/pipe[@id='{p.id}']", f"pipe {p.id} holds {len(p.buffered)} "
                                 f"bytes (at most {L.MAX_PIPE_BYTES})"))
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


def _limit_problems(state: VmState) -> list[Problem]:
    """The caps are in the ranges `vmstate run` accepts, and every guest fd is below the fd
    cap (or the restored guest would hold fds it could not have opened)."""
    limits = state.vmm.limits
    if limits is None:
        return []
    at = f"{VMM}/limits"
    found = []
    if not MIN_GUEST_FDS <= limits.max_fds <= MAX_GUEST_FDS:
        found.append(Problem(at, f"max-fds {limits.max_fds} is out of range ({MIN_GUEST_FDS} to "
                                 f"{MAX_GUEST_FDS})", "max-fds"))
    elif any(f.fd >= limits.max_fds for f in state.vmm.files) or any(
            d.fd >= limits.max_fds for d in (state.vmm.os.descriptors if state.vmm.os else ())):
        found.append(Problem(at, f"max-fds {limits.max_fds}: the guest has an fd at or above "
                                 "it", "max-fds"))
    if not 1 <= limits.max_processes <= MAX_GUEST_PROCESSES:
        found.append(Problem(at, f"max-processes {limits.max_processes} is out of range (1 to "
                                 f"{MAX_GUEST_PROCESSES})", "max-processes"))
    return found


def _sleep_problems(state: VmState) -> list[Problem]:
    pending = state.vmm.pending
    if state.vmm.sleep_left_ns is None or pending is not None and pending.nr in SLEEP_CALLS:
        return []
    return [Problem(f"{VMM}/pending-call", "a sleep's time left without a pending nanosleep or "
                    "clock_nanosleep", "sleep-left-ns")]


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
