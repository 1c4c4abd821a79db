"""The command line itself: shell completion and the package metadata (no KVM needed)."""

import os
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_shell_completion_script_and_answers(vmstate_cmd):
    script = subprocess.run([vmstate_cmd, "--show-completion", "bash"], capture_output=True,
                            text=True)
    assert script.returncode == 0 and "_vmstate_completion" in script.stdout
    answer = subprocess.run([vmstate_cmd], capture_output=True, text=True, env={
        **os.environ, "_VMSTATE_COMPLETE": "complete_bash",
        "COMP_WORDS": "vmstate receive --max-s", "COMP_CWORD": "2"})
    assert answer.stdout.split() == ["--max-size", "--max-senders"]


def test_license_is_an_spdx_expression():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
