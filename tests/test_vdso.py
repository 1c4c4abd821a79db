"""The vDSO (linux_personality/vdso.py) that AT_SYSINFO_EHDR names: independent ELF readers
find its versioned symbols, and a dietlibc program (which faults without a vDSO) runs on
both CPUs and survives a snapshot, restore, split and join."""

import ctypes
import io
import time

import pytest
from elftools.elf.elffile import ELFFile

from linux_personality import vdso

FIRST = [b"gettimeofday: yes", b"time agrees: yes"]
REST = [b"vdso getcpu: yes", b"slept 50 ms: yes", b"file written and read back: yes",
        b"hello dietlibc"]


def test_pyelftools_finds_every_symbol_versioned_linux_2_6():
    image = ELFFile(io.BytesIO(vdso.IMAGE))
    assert image["e_type"] == "ET_DYN" and image["e_machine"] == "EM_X86_64"
    symbols = image.get_section_by_name(".dynsym")
    versions = image.get_section_by_name(".gnu.version")
    definitions = image.get_section_by_name(".gnu.version_d")
    version_names = {verdef["vd_ndx"]: next(auxiliaries).name
                     for verdef, auxiliaries in definitions.iter_versions()}
    assert version_names == {1: "linux-vdso.so.1", 2: "LINUX_2.6"}
    text = image.get_section_by_name(".text")
    names = {}
    for index, symbol in enumerate(symbols.iter_symbols()):
        if symbol.name:
            names[symbol.name] = (symbol["st_value"],
                                  version_names[versions.get_symbol(index)["ndx"]])
    assert set(names) == {name.decode() for name, _ in vdso.FUNCTIONS}
    assert {version for _, version in names.values()} == {"LINUX_2.6"}
    for (value, _), (_, nr) in zip(names.values(), vdso.FUNCTIONS):
        offset = value - text["sh_addr"] + text["sh_offset"]
        assert vdso.IMAGE[offset:offset + 5] == b"\xb8" + nr.to_bytes(4, "little")


def test_the_hosts_dynamic_linker_resolves_and_runs_it(tmp_path):
    """glibc's dlopen goes through the program headers, DT_HASH and the version table."""
    path = tmp_path / "linux-vdso.so.1"
    path.write_bytes(vdso.IMAGE)
    library = ctypes.CDLL(str(path))
    library.__vdso_time.restype = ctypes.c_long
    assert abs(library.__vdso_time(None) - time.time()) < 5
    cpu = ctypes.c_uint(12345)
    assert library.__vdso_getcpu(ctypes.byref(cpu), None, None) == 0
    assert cpu.value < 4096


@pytest.mark.kvm
@pytest.mark.both_cpus
def test_a_dietlibc_program_runs_and_survives_snapshot_and_restore(vmstate, guest, tmp_path):
    ran = vmstate("run", guest("diet_time_io"), "out.txt", "diet.sav")
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout.splitlines() == [*FIRST, b"snapshot taken: yes", *REST]
    (tmp_path / "out.txt").unlink()
    restored = vmstate("restore", "diet.sav")
    assert restored.returncode == 3, restored.stderr
    assert restored.stdout.splitlines() == [b"restored: yes", *REST]
    assert (tmp_path / "out.txt").read_bytes() == b"hello dietlibc\n"


@pytest.mark.kvm
@pytest.mark.both_cpus
def test_a_dietlibc_program_survives_split_and_join(vmstate, guest, tmp_path):
    assert vmstate("run", guest("diet_time_io"), "out.txt", "diet.sav").returncode == 3
    assert vmstate("split", "diet.sav").returncode == 0
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "joined.sav")
    assert joined.returncode == 0, joined.stderr
    restored = vmstate("restore", "joined.sav")
    assert restored.returncode == 3, restored.stderr
    assert restored.stdout.splitlines() == [b"restored: yes", *REST]
