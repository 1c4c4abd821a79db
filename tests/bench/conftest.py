import pytest

from benchlib import warm_up_memory


@pytest.fixture(scope="session", autouse=True)
def warm_memory():
    warm_up_memory()
