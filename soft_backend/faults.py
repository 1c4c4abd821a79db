"""What a guest exception under unicorn was: the page-fault address and error code that KVM
would report, worked out from the instruction and the guest's page tables (unicorn's own CR2
and error code are not reliable, see UNICORN_NOTES)."""

from __future__ import annotations

import struct

from capstone import CS_AC_WRITE, CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone.x86 import X86_OP_MEM, X86_REG_INVALID, X86_REG_RIP

from vmstate.paging import ADDRESS_MASK, LEVEL_SHIFTS, PTE_P, PTE_PS, PTE_RW, PTE_US

PF_PRESENT, PF_WRITE, PF_USER, PF_FETCH = 0x1, 0x2, 0x4, 0x10
MAX_INSTRUCTION = 15
STACK_WRITERS = frozenset({"push", "call", "pushfq", "pushf"})

_disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
_disassembler.detail = True


def user_access_error(read_phys, cr3: int, address: int, write: bool) -> int | None:
    """None if ring 3 may make this access under the page tables at `cr3`; otherwise the
    page-fault error code it gets (user bit set; present bit if a mapping refused it)."""
    table = cr3 & ADDRESS_MASK
    error = PF_USER | (PF_WRITE if write else 0)
    for level, shift in enumerate(LEVEL_SHIFTS):
        try:
            entry = struct.unpack("<Q", read_phys(table + 8 * ((address >> shift) & 511), 8))[0]
        except Exception:
            return error
        if not entry & PTE_P:
            return error
        if not entry & PTE_US or (write and not entry & PTE_RW):
            return error | PF_PRESENT
        if level == 3 or (entry & PTE_PS and level in (1, 2)):
            return None
        table = entry & ADDRESS_MASK
    return error


def page_fault(read_phys, read_register, cr3: int, rip: int, nx: bool) -> tuple[int, int] | None:
    """(address, error code) of the access the instruction at `rip` cannot make, or None if
    every access it makes explicitly is allowed. `nx`: EFER.NXE, without which the CPU
    reports an instruction fetch as a read."""
    fetch = user_access_error(read_phys, cr3, rip, write=False)
    if fetch is not None:
        return rip, fetch | (PF_FETCH if nx else 0)
    code = _read_code(read_phys, cr3, rip)
    try:
        instruction = next(_disassembler.disasm(code, rip, 1), None)
    except CsError:
        instruction = None
    if instruction is None:
        return None
    accesses = []
    for operand in instruction.operands:
        if operand.type == X86_OP_MEM:
            accesses.append((_effective_address(operand.mem, instruction, read_register),
                             bool(operand.access & CS_AC_WRITE)))
    if instruction.mnemonic in STACK_WRITERS:
        accesses.append(((read_register("rsp") - 8) % (1 << 64), True))
    for address, write in accesses:
        error = user_access_error(read_phys, cr3, address, write)
        if error is not None:
            return address, error
    return None


def _read_code(read_phys, cr3: int, rip: int) -> bytes:
    """Up to 15 bytes at `rip` (fewer where the next page is not mapped)."""
    code = b""
    for address in range(rip, rip + MAX_INSTRUCTION):
        physical = _translate(read_phys, cr3, address)
        if physical is None:
            break
        code += read_phys(physical, 1)
    return code


def _translate(read_phys, cr3: int, address: int) -> int | None:
    if user_access_error(read_phys, cr3, address, write=False) is not None:
        return None
    table = cr3 & ADDRESS_MASK
    for level, shift in enumerate(LEVEL_SHIFTS):
        entry = struct.unpack("<Q", read_phys(table + 8 * ((address >> shift) & 511), 8))[0]
        if level == 3 or (entry & PTE_PS and level in (1, 2)):
            mask = (1 << shift) - 1
            return (entry & ADDRESS_MASK & ~mask) | (address & mask)
        table = entry & ADDRESS_MASK
    return None


def _effective_address(mem, instruction, read_register) -> int:
    address = mem.disp
    if mem.base == X86_REG_RIP:
        address += instruction.address + instruction.size
    elif mem.base != X86_REG_INVALID:
        address += _register(instruction, mem.base, read_register)
    if mem.index != X86_REG_INVALID:
        address += _register(instruction, mem.index, read_register) * mem.scale
    segment = instruction.reg_name(mem.segment) if mem.segment != X86_REG_INVALID else ""
    if segment in ("fs", "gs"):
        address += read_register(f"{segment}_base")
    return address % (1 << 64)


def _register(instruction, register: int, read_register) -> int:
    """A general register's value, for 64- and 32-bit names (eax reads rax's low half)."""
    name = instruction.reg_name(register)
    full = {"e": "r"}.get(name[0], "") + name[1:] if name[0] == "e" else name
    if name.startswith("r") and name.endswith("d"):
        return read_register(name[:-1]) & 0xFFFFFFFF
    value = read_register(full)
    return value & 0xFFFFFFFF if name[0] == "e" else value
