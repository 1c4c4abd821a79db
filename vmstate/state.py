"""The VM state as plain, immutable data.

These dataclasses (frozen: vmstate.record) know nothing of KVM or ctypes: the image reader/writer, split, join and info
work on them alone, and kvm_backend.vcpu_state is the one place that converts them to and from
the live KVM structures.
"""

from __future__ import annotations

from .pages import PageSet
from .record import record

PAGE_SIZE = 4096

GP_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@record
class Registers:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@record
class Segment:
    """A segment register with its hidden (descriptor cache) part, as KVM exposes it."""
    selector: int = 0
    base: int = 0
    limit: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0


SEGMENT_FIELDS = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g",
                  "avl", "unusable")


@record
class DescriptorTable:
    base: int = 0
    limit: int = 0


@record
class SpecialRegisters:
    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment()
    ldt: Segment = Segment()
    gdt: DescriptorTable = DescriptorTable()
    idt: DescriptorTable = DescriptorTable()
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


@record
class VcpuEvents:
    """Pending/injected exceptions, interrupts, NMI and SMI (struct kvm_vcpu_events)."""
    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0


VCPU_EVENT_FIELDS = tuple(VcpuEvents.__dataclass_fields__)


@record
class DebugRegisters:
    db0: int = 0
    db1: int = 0
    db2: int = 0
    db3: int = 0
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    flags: int = 0


@record
class CpuidEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


@record
class VcpuState:
    """Everything KVM holds for one vCPU. `xsave` is the raw XSAVE area (FPU, SSE, ...)."""
    id: int = 0
    regs: Registers = Registers()
    sregs: SpecialRegisters = SpecialRegisters()
    msrs: tuple[tuple[int, int], ...] = ()
    xsave: bytes = b""
    xcrs: tuple[tuple[int, int], ...] = ()
    events: VcpuEvents = VcpuEvents()
    mp_state: int = 0
    debugregs: DebugRegisters = DebugRegisters()
    cpuid: tuple[CpuidEntry, ...] = ()

    def msr(self, index: int, default: int | None = None) -> int | None:
        return dict(self.msrs).get(index, default)


@record
class MemoryRegion:
    """A range of guest physical memory and which of its pages are present.

    `present` is the set of present pages (vmstate.pages.PageSet: a bitmap; its `runs` are
    (first_page, page_count), page numbers relative to the region start). Pages outside it
    were never touched and read as zero; a present page may be zero.
    """
    guest_phys_addr: int
    size: int
    present: PageSet

    @property
    def page_count(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def present_pages(self) -> int:
        return self.present.count


# Kinds of guest file descriptors.
FD_FILE = "file"        # a regular file under the guest's root, reopened by path on restore
FD_STDIN = "stdin"      # the VMM's own standard streams, reattached on restore
FD_STDOUT = "stdout"
FD_STDERR = "stderr"


@record
class OpenFile:
    """One entry of the VMM's file table. `path` is relative to the guest root."""
    fd: int
    kind: str
    path: str = ""
    flags: int = 0
    mode: int = 0
    offset: int = 0


@record
class PendingCall:
    """A system call the guest was blocked in at save time; the guest re-issues it on resume
    (RIP points at its `syscall` instruction)."""
    nr: int
    args: tuple[int, int, int, int, int, int]
    rip: int


@record
class AddressSpace:
    """The VMM's view of the guest's user address space (all addresses are guest virtual)."""
    user_start: int = 0
    user_end: int = 0
    brk_start: int = 0
    brk: int = 0
    mmap_low: int = 0          # lowest address handed out by mmap so far (grows down)
    mmap_top: int = 0          # top of the mmap area (bottom of the stack area)
    free_ranges: tuple[tuple[int, int], ...] = ()  # (start, length) freed by munmap, reusable


@record
class Descriptor:
    """What a guest fd holds beyond its file table entry. Fds with the same `description`
    share one open-file description (offset, status flags), as after dup. A pipe end is not
    in the file table: `pipe` names the pipe and `flags` its access mode and O_NONBLOCK."""
    fd: int
    description: int
    cloexec: bool = False
    pipe: int = -1
    flags: int = 0


@record
class Pipe:
    id: int
    buffered: bytes = b""      # written, not yet read


@record
class SignalAction:
    """A struct sigaction the guest installed (handler and restorer are guest addresses)."""
    signal: int
    handler: int
    flags: int = 0
    restorer: int = 0
    mask: int = 0


@record
class GuestOs:
    """The Linux personality's state of the guest process, beyond its files and memory."""
    cwd: str = "."                         # relative to the guest root, normal form
    umask: int = 0o022
    hostname: str = "vmstate"
    uid: int = 0
    gid: int = 0
    descriptors: tuple[Descriptor, ...] = ()
    pipes: tuple[Pipe, ...] = ()
    actions: tuple[SignalAction, ...] = ()
    blocked: int = 0                       # signal masks, bit n-1 for signal n
    pending: int = 0
    altstack: tuple[int, int, int] = (0, 2, 0)     # ss_sp, ss_flags (2: SS_DISABLE), ss_size
    alarm_ns: int = 0                      # time left on the alarm (ITIMER_REAL), 0: none
    alarm_interval_ns: int = 0
    limits: tuple[tuple[int, int, int], ...] = ()   # resource, soft, hard set by the guest


DEFAULT_MAX_FDS = 1024            # --max-fds unless given
DEFAULT_MAX_PROCESSES = 256       # --max-processes unless given


@record
class GuestLimits:
    """What the user capped the guest at (vmstate run --max-file-size, --max-fds,
    --max-processes), so that a guest cannot hurt the host."""
    max_file_size: int | None = None     # bytes a guest write may make a file reach; None: no cap
    max_fds: int = DEFAULT_MAX_FDS        # open descriptors (EMFILE past it)
    max_processes: int = DEFAULT_MAX_PROCESSES    # live processes in the guest's tree (EAGAIN)


@record
class VmmState:
    """Device and bookkeeping state kept by the VMM rather than by KVM."""
    program: str = ""
    argv: tuple[str, ...] = ()
    files: tuple[OpenFile, ...] = ()
    address_space: AddressSpace = AddressSpace()
    pending: PendingCall | None = None
    os: GuestOs | None = None          # None: an image from before the vmm-os section
    saved_by: str = ""          # the CPU that ran the guest when it was saved: "kvm" or "soft"
    limits: GuestLimits | None = None  # None: an image from before vmm-limits (the defaults)
    sleep_left_ns: int | None = None   # a pending relative sleep's time left; None: no such call


@record
class ExtraSection:
    """A section this version does not understand, carried through unchanged."""
    type: int
    instance: int
    flags: int
    data: bytes


@record
class VmState:
    vcpus: tuple[VcpuState, ...]
    memory: tuple[MemoryRegion, ...]
    vmm: VmmState = VmmState()
    extra: tuple[ExtraSection, ...] = ()
