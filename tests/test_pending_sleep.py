"""A relative sleep interrupted by a save resumes after the restore with the time it had left
(image section vmm-sleep-left), not its whole request. The guest (tests/guests/sleep_left.c)
sleeps 8 s and prints how late it woke against its deadline on its own monotonic clock (never
early). Saved 5 s into the sleep, the restored guest sleeps about the 3 s it had left; re-issued
with the whole request it would sleep 8 s. The tests time the restore itself, not the guest's
lateness, which also counts whatever ran between the save and the restore (under load, seconds).
"""

import json
import re
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.kvm

SLEEP_MS, SAVE_AFTER_S = 8000, 5.0
LATE = re.compile(rb"slept 0, late (-?\d+) ms")


def _saved_mid_sleep(vmstate_cmd, guest, cwd, *args, after_s=SAVE_AFTER_S):
    run = subprocess.Popen([vmstate_cmd, "run", "--save-on-signal", guest("sleep_left"),
                            str(SLEEP_MS), *args], cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert run.stdout.readline() == b"sleeping\n"
    time.sleep(after_s)
    run.send_signal(signal.SIGUSR1)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert out == b"", out                     # it did not wake before the save


def _restore(vmstate, image) -> tuple[float, int]:
    """Run the restore of `image`: its wall time (s) and how late the guest woke (ms)."""
    start = time.monotonic()
    result = vmstate("restore", image)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    return elapsed, int(LATE.fullmatch(result.stdout.strip())[1])


@pytest.mark.both_cpus
@pytest.mark.parametrize("call", ["nanosleep", "clock_nanosleep"])
def test_an_interrupted_sleep_resumes_with_the_time_it_had_left(vmstate_cmd, vmstate, guest,
                                                                 tmp_path, cpu, call):
    _saved_mid_sleep(vmstate_cmd, guest, tmp_path, *(["relative"] if call != "nanosleep" else []))
    slept, late = _restore(vmstate, "vm_image.sav")
    assert late >= 0                                      # not before its deadline
    assert slept < SLEEP_MS / 1000 - 1.5, slept           # about 3 s; the whole request: 8 s
    pending = json.loads(vmstate("info", "--json", "vm_image.sav").stdout)["pending_call"]
    assert pending["name"] == call
    assert 0 < pending["sleep_left_ns"] / 1e9 < SLEEP_MS / 1000 - SAVE_AFTER_S + 0.5


def test_the_time_left_is_carried_and_editable_through_split_and_join(vmstate_cmd, vmstate,
                                                                      guest, tmp_path):
    _saved_mid_sleep(vmstate_cmd, guest, tmp_path, after_s=1.0)       # about 7 s left
    assert vmstate("split", "vm_image.sav").returncode == 0
    xml = (tmp_path / "hw.xml").read_text()
    left = re.search(r'sleep-left-ns="(\d+)"', xml)[1]
    (tmp_path / "hw.xml").write_text(xml.replace(f'sleep-left-ns="{left}"', 'sleep-left-ns="0"'))
    joined = vmstate("join", "vm.core", "hw.xml", "-o", "woken.sav")
    assert joined.returncode == 0, joined.stderr
    assert f"pending call sleep_left_ns: {left} -> 0" in joined.stdout.decode()
    info = json.loads(vmstate("info", "--json", "woken.sav").stdout)
    assert info["pending_call"]["sleep_left_ns"] == 0
    slept, _ = _restore(vmstate, "woken.sav")                 # it wakes at once
    assert slept < 4.0, slept                                 # unedited: about 7 s
