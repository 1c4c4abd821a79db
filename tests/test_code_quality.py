"""Static checks that catch what only a rarely taken path would show at run time: undefined
names, unused imports, syntax errors (ruff's pyflakes rules)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_no_undefined_names_or_unused_imports():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists() and not shutil.which("ruff"):
        pytest.fail("ruff is not installed (it is in the test extras: pip install -e '.[test]')")
    result = subprocess.run([str(ruff if ruff.exists() else "ruff"), "check", "--select",
                             "F,E9", "--no-cache", "vmstate", "kvm_backend", "linux_personality",
                             "machine", "soft_backend", "tests", "schemas"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
