"""Everyday busybox-static commands behave in the VM exactly as on Linux: same stdout, exit
status and directory tree left behind (see tests/conformance.py; `python -m
tests.conformance` prints the pass rate)."""

from __future__ import annotations

import pytest

from tests.conformance import CASES, MUST_DIFFER, compare, native_available, run_native, run_vm

pytestmark = [pytest.mark.kvm, pytest.mark.both_cpus]

_MISSING = native_available()


@pytest.mark.skipif(_MISSING is not None, reason=f"cannot run natively: {_MISSING}")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_command_behaves_like_linux(case, tmp_path, vmstate_cmd, cpu):
    native = run_native(case, tmp_path / "native")
    vm = run_vm(case, tmp_path / "vm", vmstate_cmd, cpu)
    problems = compare(native, vm, stdout_may_differ=case.name in MUST_DIFFER)
    assert problems == [], problems


def test_every_case_has_a_name_of_its_own():
    """Results are kept and reported by name (bench_soft_cpu's pass count was off by one
    while two cases were called "false")."""
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
