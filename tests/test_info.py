"""`vmstate info`: guest-controlled text shown escaped, any locale, and JSON that is valid,
lossless and documented key by key in schemas/info-json.md."""

import base64
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from strategies import memory_views, sample_state
from vmstate.hwxml import from_xml
from vmstate.image.writer import write_image

pytestmark = pytest.mark.kvm

SPEC = Path(__file__).resolve().parent.parent / "schemas" / "info-json.md"
ARGS = ["caf\u00e9", "\x1b[31mred", os.fsdecode(b"not utf-8 \xff")]
ASCII = {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"}


@pytest.fixture
def saved(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app"), *ARGS).returncode == 0
    return tmp_path


def test_info_escapes_guest_text_and_works_in_an_ascii_locale(vmstate, saved, example):
    result = vmstate("info", "vm_image.sav", env=ASCII)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("ascii")                  # nothing but ASCII reaches the tty
    assert "\x1b" not in text
    program = next(line for line in text.splitlines() if line.startswith("Program"))
    assert program.split(None, 1)[1] == (
        f"{example('lab_app')} caf\\xc3\\xa9 \\x1b[31mred not utf-8 \\xff")


def test_info_escapes_an_unknown_saved_by_value(vmstate, tmp_path):
    """The reader does not check vmm-saved-by's text (image-format.md 6.16): a crafted image
    must not reach the terminal with it."""
    state, contents = sample_state()
    state = replace(state, vmm=replace(state.vmm, saved_by="\x1b]0;owned\x07"))
    write_image(str(tmp_path / "crafted.sav"), state, memory_views(contents))
    result = vmstate("info", "crafted.sav", env=ASCII)
    assert result.returncode == 0, result.stderr
    assert "Saved by  \\x1b]0;owned\\x07" in result.stdout.decode("ascii").splitlines()


def test_info_json_is_valid_utf8_and_keeps_names_that_are_not(vmstate, saved):
    result = vmstate("info", "--json", "vm_image.sav", env=ASCII)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.decode("utf-8", errors="strict"))
    argv = data["program"]["argv"]
    assert argv[1] == {"value": "caf\u00e9"} and argv[2] == {"value": "\x1b[31mred"}
    assert argv[3]["value"] == "not utf-8 \ufffd"
    assert base64.b64decode(argv[3]["value_base64"]) == b"not utf-8 \xff"


def test_info_json_shows_what_the_text_omits(vmstate, saved):
    data = json.loads(vmstate("info", "--json", "vm_image.sav").stdout)
    vcpu = data["vcpus"][0]
    assert len(vcpu["cpuid"]) == vcpu["cpuid_entries"] > 0
    assert {"function", "index", "eax", "ebx", "ecx", "edx", "flags"} == set(vcpu["cpuid"][0])
    assert set(vcpu["fpu"]["st"]) == {f"st{i}" for i in range(8)}
    assert vcpu["debug"]["dr7"] == "0x400" and "db0" in vcpu["debug"]
    assert "exception_nr" in vcpu["events"]
    region = data["memory"][0]
    assert sum(run["pages"] for run in region["present_runs"]) == region["present_pages"]
    assert isinstance(data["address_space"]["free_ranges"], list)
    assert vmstate("split", "vm_image.sav").returncode == 0
    document = from_xml((saved / "hw.xml").read_bytes(), "hw.xml")
    assert int(data["image"]["digest"], 16) == document.provenance.image_digest


def _documented() -> set[str]:
    """Every key path in the first column of the spec's table (`.x` continues the last)."""
    paths = set()
    for line in SPEC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        parent = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            path = parent + token if token.startswith(".") else token
            parents = path.rsplit(".", 1)
            parent = parents[0] if len(parents) == 2 else ""
            paths.add(path)
    return paths


def _paths(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item, prefix + "[]")
    else:
        yield prefix


def _generic(path: str) -> str:
    path = re.sub(r"registers\.\w+$", "registers.NAME", path)
    path = re.sub(r"segments\.\w+\.", "segments.SEG.", path)
    return re.sub(r"\.(st|xmm|xcr)\d+$", r".\1N", path)


def test_every_info_json_key_is_documented(vmstate, saved):
    data = json.loads(vmstate("info", "--json", "vm_image.sav").stdout)
    found = {_generic(path) for path in _paths(data)}
    assert found - _documented() == set()
    assert {"image.digest", "program.argv[].value_base64", "vcpus[].cpuid[].eax"} <= found
