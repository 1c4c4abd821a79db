"""The `vmstate` command. Each command is a few lines calling library code; errors become a
one-line message and an exit status (see vmstate.errors and the README)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_ERROR, EXIT_SIGNAL_BASE, VmstateError
from .units import parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,
                  help="Save, inspect, edit and migrate the state of small KVM virtual machines.")

DEFAULT_MEMORY = "64M"


@app.callback()
def _commands() -> None:
    """Save, inspect, edit and migrate the state of small KVM virtual machines."""


def _fail(message: str, code: int) -> None:
    print(f"vmstate: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    program: Annotated[Path, typer.Argument(help="Static x86-64 Linux executable.")],
    args: Annotated[Optional[list[str]], typer.Argument(help="Arguments for the program.")] = None,
    memory: Annotated[str, typer.Option(help="Guest memory size (e.g. 64M, 1G).")] = DEFAULT_MEMORY,
    root: Annotated[Path, typer.Option(help="Directory the guest's file paths resolve in.")] = Path("."),
    trace: Annotated[bool, typer.Option(help="Print each guest system call on stderr.")] = False,
):
    """Run PROGRAM in a new KVM virtual machine; its exit status becomes vmstate's.

    Example: vmstate run --trace examples/hello one two
    """
    from kvm_backend.session import run_program
    outcome = run_program(str(program), [str(program), *(args or [])], parse_size(memory),
                          str(root), trace=sys.stderr if trace else None)
    _finish(outcome)


def _finish(outcome) -> None:
    from kvm_backend.vm import Exited
    if isinstance(outcome, Exited):
        raise typer.Exit(outcome.status)
    _fail(outcome.report, EXIT_SIGNAL_BASE + outcome.signal)


def main() -> None:
    try:
        app()
    except VmstateError as e:
        print(f"vmstate: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("vmstate: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except Exception as e:  # a bug in vmstate: one line, the traceback only on request
        if os.environ.get("VMSTATE_DEBUG"):
            raise
        print(f"vmstate: internal error: {type(e).__name__}: {e} (set VMSTATE_DEBUG=1 for "
              "a traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
