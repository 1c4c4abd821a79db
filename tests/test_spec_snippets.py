"""The code in the specs under schemas/ runs on what vmstate writes today: each snippet is
taken from its spec and run against fresh output, so a format change that leaves a spec
behind fails here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def python_snippet(spec: str, heading: str) -> str:
    """The first ```python block after `heading` in schemas/SPEC."""
    text = (SCHEMAS / spec).read_text()
    section = text[text.index(heading):]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match, f"no python block after {heading!r} in {spec}"
    return match.group(1)


@pytest.mark.kvm
def test_the_image_specs_minimal_check_passes_on_a_fresh_image(vmstate, example, tmp_path):
    assert vmstate("run", example("lab_app")).returncode == 0
    snippet = python_snippet("image-format.md", "## 11. Worked example")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    image = json.loads(vmstate("info", "--json", "vm_image.sav").stdout)["image"]
    assert ran.stdout.strip() == (f"format {image['format']}, {image['sections']} sections, "
                                  f"image digest {image['digest']}")
