"""Binary layout of vmstate image files, format 2.2. The normative description with the same
tables is schemas/image-format.md; every structure is declared here once and used everywhere.

    +--------------------+ 0
    | file header        |  64 bytes
    +--------------------+ table_offset (64)
    | section table      |  section_count x 32 bytes
    +--------------------+
    | section payloads   |  each 8-byte aligned, in table order
    +--------------------+ memory regions' data_offset (4096-aligned)
    | guest memory       |  raw, one region after another; holes where pages are absent
    +--------------------+ file_size
"""

import struct

from ..state import FD_FILE, FD_STDERR, FD_STDIN, FD_STDOUT

MAGIC = b"VMSTATE\0"
VERSION_MAJOR, VERSION_MINOR = 2, 2
PAGE = 4096
ALIGN = 8

# magic, major, minor, header_size, section_count, flags, table_offset, file_size,
# table_hash, reserved, header_hash (over the 56 bytes 0..55)
HEADER = struct.Struct("<8sHHIIIQQQ8xQ")
HEADER_HASHED = 56
# type, flags, instance, offset, size, hash
SECTION_ENTRY = struct.Struct("<HHIQQQ")
SECTION_OPTIONAL = 0x1          # section flag: a reader may skip an unknown one (and keeps it)

# Section types. Instance = vCPU id for VCPU_*, region index for MEMORY_REGION, else 0.
VCPU_REGS, VCPU_SREGS, VCPU_MSRS, VCPU_XSAVE = 0x0010, 0x0011, 0x0012, 0x0013
VCPU_XCRS, VCPU_EVENTS, VCPU_MP_STATE, VCPU_DEBUGREGS, VCPU_CPUID = (
    0x0014, 0x0015, 0x0016, 0x0017, 0x0018)
MEMORY_REGION = 0x0020
VMM_PROGRAM, VMM_FILES, VMM_ADDRESS_SPACE, VMM_PENDING_CALL = 0x0030, 0x0031, 0x0032, 0x0033
VMM_OS = 0x0034
VMM_SAVED_BY = 0x0035                           # 2.1, optional: a 2.0 reader skips it
# The first 2.1 writers, before vmm-os existed, gave vmm-saved-by the type vmm-os has now; they
# set SECTION_OPTIONAL on it, which vmm-os never carries (image-format.md 6.16).
EARLY_SAVED_BY = VMM_OS
VMM_LIMITS, VMM_SLEEP_LEFT = 0x0036, 0x0037    # 2.2, optional: a 2.1 reader skips them
OPTIONAL_TYPES = frozenset({VMM_SAVED_BY, VMM_LIMITS, VMM_SLEEP_LEFT})   # SECTION_OPTIONAL

SECTION_NAMES = {
    VCPU_REGS: "vcpu-regs", VCPU_SREGS: "vcpu-sregs", VCPU_MSRS: "vcpu-msrs",
    VCPU_XSAVE: "vcpu-xsave", VCPU_XCRS: "vcpu-xcrs", VCPU_EVENTS: "vcpu-events",
    VCPU_MP_STATE: "vcpu-mp-state", VCPU_DEBUGREGS: "vcpu-debugregs", VCPU_CPUID: "vcpu-cpuid",
    MEMORY_REGION: "memory-region", VMM_PROGRAM: "vmm-program", VMM_FILES: "vmm-files",
    VMM_ADDRESS_SPACE: "vmm-address-space", VMM_PENDING_CALL: "vmm-pending-call",
    VMM_OS: "vmm-os",
    VMM_SAVED_BY: "vmm-saved-by", VMM_LIMITS: "vmm-limits", VMM_SLEEP_LEFT: "vmm-sleep-left",
}

REGS = struct.Struct("<18Q")                    # rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
SEGMENT = struct.Struct("<QIH9Bx")              # base limit selector type present dpl db s l g avl unusable
DTABLE = struct.Struct("<QH6x")                 # base limit
SREGS_TAIL = struct.Struct("<7Q4Q")             # cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]
COUNT = struct.Struct("<I4x")                   # element count of a list section
MSR_ENTRY = struct.Struct("<I4xQ")              # index, value
XCR_ENTRY = struct.Struct("<I4xQ")              # index, value
EVENTS = struct.Struct("<4BI4B4BII4BB26xBQ")    # see schemas/image-format.md
MP_STATE = struct.Struct("<I4x")
DEBUGREGS = struct.Struct("<7Q")                # db0 db1 db2 db3 dr6 dr7 flags
CPUID_ENTRY = struct.Struct("<7I4x")            # function index flags eax ebx ecx edx
REGION = struct.Struct("<QQQI4x")               # guest_phys_addr, size, data_offset, chunk_pages;
                                                # present bitmap and chunk checksums follow
CHUNK_HASH = struct.Struct("<Q")                # XXH3-64 of one chunk's present pages
FILE_ENTRY = struct.Struct("<iBxxxIIQI4x")      # fd kind flags mode offset path_length (path follows)
FILE_KINDS = (FD_FILE, FD_STDIN, FD_STDOUT, FD_STDERR)     # the kind byte indexes this
STRING = struct.Struct("<I4x")                  # byte length; the bytes follow, padded to 8
ADDRESS_SPACE = struct.Struct("<6QI4x")         # user_start user_end brk_start brk mmap_low mmap_top free_count
FREE_RANGE = struct.Struct("<QQ")               # start, length
LIMITS = struct.Struct("<QII")                  # max_file_size (2^64-1: none) max_fds max_processes
NO_FILE_SIZE_CAP = 2**64 - 1
SLEEP_LEFT = struct.Struct("<Q")                # ns
PENDING_CALL = struct.Struct("<Q6QQ")           # nr, args[6], rip of the syscall instruction
# vmm-os: header, then strings cwd and hostname, then four counted lists
OS_HEADER = struct.Struct("<III4xQQQIxxxxQQQ")  # umask uid gid, blocked pending, ss_sp ss_flags ss_size, alarm_ns interval_ns
DESCRIPTOR = struct.Struct("<iiiIB7x")          # fd description pipe flags cloexec
PIPE = struct.Struct("<iI")                     # id, buffered length (the bytes follow, padded to 8)
MAX_PIPE_BYTES = 1 << 20         # a pipe holds at most this much (Linux's default cap)
SIGNAL_ACTION = struct.Struct("<I4xQQQQ")       # signal handler flags restorer mask
LIMIT = struct.Struct("<I4xQQ")                 # resource soft hard

assert HEADER.size == 64 and SECTION_ENTRY.size == 32 and SEGMENT.size == 24
assert DTABLE.size == 16 and EVENTS.size == 64 and REGION.size == 32


def align(value: int, to: int = ALIGN) -> int:
    return (value + to - 1) // to * to
