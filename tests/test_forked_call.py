"""vmstate.background.ForkedCall: a function run in a forked child, its value or its exception
brought back."""

import os
import time

import pytest

from vmstate.background import ForkedCall
from vmstate.errors import ImageError


def test_the_function_runs_in_another_process_and_succeeds(tmp_path):
    marker = tmp_path / "pid"
    call = ForkedCall(lambda: marker.write_text(str(os.getpid())), "write-pid")
    call.result()
    call.result()                       # collected once, answered again
    assert int(marker.read_text()) != os.getpid()
    call.close()


def test_the_functions_value_comes_back():
    call = ForkedCall(lambda: [(os.getpid(), "pages"), (2, 3)], "value")
    (child, what), rest = call.result()
    assert child != os.getpid() and what == "pages" and rest == (2, 3)


def test_the_childs_exception_is_raised_in_the_caller():
    def damaged():
        raise ImageError("guest memory 0x0-0x100000 fails its checksum", "x.sav: offset 0x1000")
    call = ForkedCall(damaged, "verify")
    with pytest.raises(ImageError, match=r"^x.sav: offset 0x1000: guest memory .* checksum$"):
        call.result()
    with pytest.raises(ImageError):
        call.result()


def test_an_exception_that_does_not_pickle_comes_back_as_its_text():
    class Local(Exception):                   # a local class cannot be pickled
        pass

    def fail():
        raise Local("no such thing")
    with pytest.raises(RuntimeError, match="Local: no such thing"):
        ForkedCall(fail, "local").result()


def test_close_ends_a_child_still_running():
    call = ForkedCall(lambda: time.sleep(60), "sleeper")
    start = time.monotonic()
    call.close()
    assert time.monotonic() - start < 10
    with pytest.raises(ChildProcessError, match="sleeper"):
        call.result()
