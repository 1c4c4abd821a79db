import compileall
import os
import shutil
from pathlib import Path

import pytest

from benchlib import warm_up_memory


@pytest.fixture(scope="session", autouse=True)
def warm_memory():
    warm_up_memory(int(os.environ.get("VMSTATE_BENCH_WARM_GIB", "8")))


@pytest.fixture(scope="session", autouse=True)
def bytecode():
    """The project's modules compiled, as `pip install` leaves a package: with
    PYTHONDONTWRITEBYTECODE=1 in the environment an editable install would otherwise compile
    every module on every start (about 50 ms of each command's start-up). Every package of
    the project: a package left out (machine/ was) costs its compile in every command."""
    repo = Path(__file__).resolve().parents[2]
    for package in sorted(init.parent for init in repo.glob("*/__init__.py")):
        compileall.compile_dir(package, quiet=1)


@pytest.fixture(autouse=True)
def free_scratch_space(tmp_path):
    """A benchmark leaves up to several GiB of images and cores behind: removed after it
    (a tmpfs --basetemp would otherwise fill memory)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
