import os

import pytest

from benchlib import warm_up_memory


@pytest.fixture(scope="session", autouse=True)
def warm_memory():
    warm_up_memory(int(os.environ.get("VMSTATE_BENCH_WARM_GIB", "14")))
