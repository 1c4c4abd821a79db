import os
import shutil

import pytest

from benchlib import warm_up_memory


@pytest.fixture(scope="session", autouse=True)
def warm_memory():
    warm_up_memory(int(os.environ.get("VMSTATE_BENCH_WARM_GIB", "8")))


@pytest.fixture(autouse=True)
def free_scratch_space(tmp_path):
    """A benchmark leaves up to several GiB of images and cores behind: removed after it
    (a tmpfs --basetemp would otherwise fill memory)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
