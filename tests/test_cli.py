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


def test_one_command_is_parsed_as_in_the_whole_app():
    """main() gives typer only the command named first (start-up time): that command's
    options, arguments and help must be those it has in the whole app."""
    from typer.testing import CliRunner

    from vmstate.cli import _app_for, app
    names = ["run", "restore", "host", "ctl", "info", "send", "receive", "split", "join", "gdb"]
    for name in names:
        lean = _app_for([name, "--help"])
        assert len(lean.registered_commands) == 1
        whole_help = CliRunner().invoke(app, [name, "--help"]).output
        assert name in whole_help and CliRunner().invoke(lean, [name, "--help"]).output == whole_help
    assert len(app.registered_commands) == len(names)
    assert _app_for(["--help"]) is app and _app_for(["runn"]) is app and _app_for([]) is app
