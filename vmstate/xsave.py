"""The legacy (FXSAVE) region at the start of an XSAVE area: x87 and SSE state.

The same 512 bytes are Linux's `user_fpregs_struct` (the NT_FPREGSET note of a core file)."""

from __future__ import annotations

import struct

from .record import record

LEGACY_SIZE = 512
XSAVE_HEADER_OFFSET, XSAVE_HEADER_SIZE = 512, 64
# fcw fsw ftw(abridged) fop fip fdp mxcsr mxcsr_mask, then st0-7 (16 bytes each), xmm0-15
CONTROL = struct.Struct("<HHBxHQQII")
ST_OFFSET, XMM_OFFSET = 32, 160
ST_COUNT, XMM_COUNT = 8, 16
CONTROL_FIELDS = ("fcw", "fsw", "ftw", "fop", "fip", "fdp", "mxcsr", "mxcsr_mask")


@record
class FpuState:
    fcw: int
    fsw: int
    ftw: int
    fop: int
    fip: int
    fdp: int
    mxcsr: int
    mxcsr_mask: int
    st: tuple[bytes, ...]       # 8 x 10-byte 80-bit values (the 6 padding bytes are dropped)
    xmm: tuple[bytes, ...]      # 16 x 16 bytes


def decode(xsave: bytes) -> FpuState:
    area = xsave.ljust(LEGACY_SIZE, b"\0")
    control = CONTROL.unpack_from(area, 0)
    st = tuple(area[ST_OFFSET + 16 * i:ST_OFFSET + 16 * i + 10] for i in range(ST_COUNT))
    xmm = tuple(area[XMM_OFFSET + 16 * i:XMM_OFFSET + 16 * (i + 1)] for i in range(XMM_COUNT))
    return FpuState(*control, st=st, xmm=xmm)


def encode(fpu: FpuState, xsave: bytes) -> bytes:
    """`xsave` with its legacy region replaced by `fpu` (all other bytes kept)."""
    area = bytearray(xsave.ljust(LEGACY_SIZE, b"\0"))
    reserved = area[5]                  # the pad byte after the abridged tag word
    CONTROL.pack_into(area, 0, *(getattr(fpu, name) for name in CONTROL_FIELDS))
    area[5] = reserved
    for i, value in enumerate(fpu.st):
        area[ST_OFFSET + 16 * i:ST_OFFSET + 16 * i + 10] = value
    for i, value in enumerate(fpu.xmm):
        area[XMM_OFFSET + 16 * i:XMM_OFFSET + 16 * (i + 1)] = value
    return bytes(area)

