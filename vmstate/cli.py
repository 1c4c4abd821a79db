"""The `vmstate` command. Each command is a few lines calling library code; errors become a
one-line message and an exit status (see vmstate.errors and the README)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import (
    EXIT_ERROR, EXIT_SIGNAL_BASE, FileMissingError, UsageError, VmstateError, describe_error,
    shorten, shorten_message)
from .state import DEFAULT_MAX_FDS, DEFAULT_MAX_PROCESSES, GuestLimits
from .units import parse_size

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  help="Save, inspect, edit and migrate the state of virtual machines.")

DEFAULT_MEMORY = "64M"
DEFAULT_IMAGE = "vm_image.sav"


@app.callback()
def _commands() -> None:
    """Save, inspect, edit and migrate the state of small KVM virtual machines."""


def _fail(message: str, code: int) -> None:
    print(f"vmstate: {message}", file=sys.stderr)
    raise typer.Exit(code)


# -- option values: a bad one is a bad command line (exit status 2), said in one line ---------

def _size(option: str, text: str) -> int:
    try:
        return parse_size(text)
    except VmstateError as e:
        raise UsageError(f"{option}: {e}") from None


def _in_range(option: str, value, low, high):
    if not low <= value <= high:        # NaN fails too
        raise UsageError(f"{option} {shorten(str(value))}: must be from {low} to {high}")
    return value


def _count(option: str, text: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (a one-line error otherwise, never click's)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"{option} {shorten(text) if text else repr(text)}: not a whole "
                         "number") from None
    return _in_range(option, value, low, high)


def _address(option: str, text: str) -> tuple[str, int]:
    from .migration.protocol import parse_address
    try:
        return parse_address(text)
    except VmstateError as e:
        raise UsageError(f"{option}: {e}") from None


MAX_INSTRUCTIONS = 10_000
MAX_PORT = 65535


RootOption = Annotated[Path, typer.Option(help="Directory the guest's file paths resolve in.")]
TraceOption = Annotated[bool, typer.Option(help="Print each guest system call on stderr.")]
ImageOption = Annotated[Path, typer.Option("--image", help="Where a SAVE writes the image.")]
SignalOption = Annotated[bool, typer.Option(help="Save the VM when vmstate gets SIGUSR1.")]
InterruptOption = Annotated[bool, typer.Option(help="Save the VM on SIGINT (Ctrl-C).")]
MigrateOption = Annotated[Optional[str], typer.Option(
    metavar="HOST:PORT", help="At a SAVE, stream the VM to `vmstate receive` there instead of "
    "writing --image (which is written only if that fails).")]
WithFilesOption = Annotated[bool, typer.Option(
    help="Carry the contents of the guest's open files along (for hosts that share nothing).")]
ConnectTimeoutOption = Annotated[float, typer.Option(
    help="Seconds to keep retrying the connection, once a second.")]
CpuOption = Annotated[str, typer.Option(
    "--cpu", metavar="kvm|soft|auto", envvar="VMSTATE_CPU", help="What runs the guest: KVM, the "
    "software CPU (unicorn, no /dev/kvm needed), or KVM when it can create a VM and the "
    "software CPU otherwise.")]
MaxInstructionsOption = Annotated[Optional[int], typer.Option(
    metavar="N", help="Stop the guest after exactly N instructions and save it (software CPU "
    "only).")]
ControlOption = Annotated[Optional[Path], typer.Option(
    metavar="PATH", help="Serve a control socket there (JSON lines; see `vmstate ctl`).")]
SliceOption = Annotated[Optional[int], typer.Option(
    "--slice-ms", help="Time slice of each vCPU in milliseconds (vm_exec_slice_ms; "
    "default 10).")]
LiveOption = Annotated[bool, typer.Option(
    help="Migrate live (pre-copy), with --migrate-to and for para-call 403: the guest runs "
    "on while its memory is sent, and stays here if the migration fails.")]
MaxDowntimeOption = Annotated[float, typer.Option(
    metavar="MS", help="Live migration: stop the guest for the last pages once they can go "
    "in this many milliseconds.")]


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    program: Annotated[Path, typer.Argument(help="Static x86-64 Linux executable.")],
    args: Annotated[Optional[list[str]], typer.Argument(help="Arguments for the program.")] = None,
    memory: Annotated[str, typer.Option(help="Guest memory size (e.g. 64M, 1G).")] = DEFAULT_MEMORY,
    root: RootOption = Path("."),
    trace: TraceOption = False,
    image: ImageOption = Path(DEFAULT_IMAGE),
    save_on_signal: SignalOption = False,
    save_on_interrupt: InterruptOption = False,
    migrate_to: MigrateOption = None,
    with_files: WithFilesOption = False,
    connect_timeout: ConnectTimeoutOption = 30.0,
    live: LiveOption = False,
    max_downtime: MaxDowntimeOption = 50.0,
    cwd: Annotated[str, typer.Option(help="The guest's starting directory (a path inside "
                                     "--root, which is the guest's /).")] = "/",
    hostname: Annotated[str, typer.Option(help="The guest's host name (uname).")] = "vmstate",
    max_file_size: Annotated[Optional[str], typer.Option(
        help="Largest size a guest write may make a file (e.g. 100M); past it, EFBIG.")] = None,
    max_fds: Annotated[str, typer.Option(help="Most descriptors the guest may have open "
                                         "(EMFILE past it).")] = str(DEFAULT_MAX_FDS),
    max_processes: Annotated[str, typer.Option(
        help="Most processes the guest's tree may hold at a time (fork: EAGAIN past it).")]
    = str(DEFAULT_MAX_PROCESSES),
    cpu: CpuOption = "auto",
    max_instructions: MaxInstructionsOption = None,
    control: ControlOption = None,
):
    """Run PROGRAM in a new KVM virtual machine; its exit status becomes vmstate's.

    The guest asks for a SAVE with syscall(400): the VM is written to --image and vmstate
    exits 0. Example: vmstate run --trace examples/hello one two
    """
    from kvm_backend.session import check_memory_size, run_program

    from .atomic import refuse_clobbering
    memory_size = check_memory_size(_size("--memory", memory))
    _check_save_options(migrate_to, connect_timeout, max_downtime)
    refuse_clobbering({"--image": str(image)}, {"the program": str(program)})
    save = _save_options(image, save_on_signal, save_on_interrupt, migrate_to, with_files,
                         connect_timeout, live, max_downtime)
    from linux_personality.options import GuestOptions
    from vmstate.validate import MAX_GUEST_FDS, MAX_GUEST_PROCESSES, MIN_GUEST_FDS
    if len(hostname.encode()) > 64:
        raise UsageError("--hostname: at most 64 bytes")
    limits = GuestLimits(
        max_fds=_count("--max-fds", max_fds, MIN_GUEST_FDS, MAX_GUEST_FDS),
        max_processes=_count("--max-processes", max_processes, 1, MAX_GUEST_PROCESSES),
        max_file_size=(_size("--max-file-size", max_file_size)
                       if max_file_size is not None else None))
    options = GuestOptions(cwd=cwd, hostname=hostname, limits=limits)
    argv = [str(program), *(args or [])]
    if control is not None:
        from .vmm_config import VmEntry, complete
        entry = complete([VmEntry(program=str(program), argv=tuple(argv), root=str(root),
                                  memory=memory_size, image=str(image))], VmEntry())[0]
        _finish(_hosted_alone(entry, control, save, trace, options, cpu, max_instructions))
    outcome = run_program(str(program), argv, memory_size, str(root), save,
                          trace=sys.stderr if trace else None, options=options,
                          cpu=cpu, max_instructions=max_instructions)
    _finish(outcome)


def _save_options(image: Path, save_on_signal: bool, save_on_interrupt: bool,
                  migrate_to: str | None, with_files: bool, connect_timeout: float, live: bool,
                  max_downtime: float):
    from kvm_backend.session import SaveOptions     # the VMM's imports: after the checks
    return SaveOptions(str(image), save_on_signal, save_on_interrupt, migrate_to, with_files,
                       connect_timeout, live, max_downtime / 1000)


@app.command()
def restore(
    image_file: Annotated[Path, typer.Argument(metavar="IMAGE", help="A saved VM image.")],
    root: RootOption = Path("."),
    trace: TraceOption = False,
    image: ImageOption = Path(DEFAULT_IMAGE),
    save_on_signal: SignalOption = False,
    save_on_interrupt: InterruptOption = False,
    migrate_to: MigrateOption = None,
    with_files: WithFilesOption = False,
    connect_timeout: ConnectTimeoutOption = 30.0,
    cpu: CpuOption = "auto",
    max_instructions: MaxInstructionsOption = None,
    control: ControlOption = None,
    live: LiveOption = False,
    max_downtime: MaxDowntimeOption = 50.0,
):
    """Create a blank VM from IMAGE and resume the guest exactly where it stopped.

    Example: vmstate restore vm_image.sav
    """
    _check_save_options(migrate_to, connect_timeout, max_downtime)
    if control is not None:
        from .vmm_config import VmEntry, complete
        entry = complete([VmEntry(snapshot=str(image_file), root=str(root), image=str(image))],
                         VmEntry())[0]
        save = _save_options(image, save_on_signal, save_on_interrupt, migrate_to, with_files,
                             connect_timeout, live, max_downtime)
        _finish(_hosted_alone(entry, control, save, trace, cpu=cpu,
                              max_instructions=max_instructions))
    from .image.reader import Image     # before the VMM's imports, which the memory check overlaps
    opened = Image(str(image_file))
    memory_check = opened.start_memory_check()
    save = _save_options(image, save_on_signal, save_on_interrupt, migrate_to, with_files,
                         connect_timeout, live, max_downtime)
    from kvm_backend.session import restore_image
    outcome = restore_image(opened, memory_check, str(root), save,
                            trace=sys.stderr if trace else None, cpu=cpu,
                            max_instructions=max_instructions)
    _finish(outcome)


def _hosted_alone(entry, control: Path, save, trace: bool, options=None, cpu: str = "auto",
                  max_instructions: int | None = None):
    """run/restore --control: the one VM on a host that serves the control socket."""
    if max_instructions is not None:
        raise UsageError("--max-instructions cannot be combined with --control: a hosted VM "
                         "runs in time slices (vm_exec_slice_in_instructions counts them)")
    from kvm_backend.host import run_hosted
    from linux_personality.options import GuestOptions
    from .vmm_config import DEFAULT_SLICE_MS
    host = run_hosted([entry], DEFAULT_SLICE_MS, str(control), options=options or GuestOptions(),
                      save=save, trace=sys.stderr if trace else None, cpu=cpu)
    return host.vms[0].outcome


@app.command(name="host")
def host_command(
    vm: Annotated[Optional[list[str]], typer.Option(
        "-v", "--vm", metavar="'PROGRAM ARGS'", help="A VM running this program (with its "
        "arguments, quoted as in a shell). Repeat for more VMs.")] = None,
    snapshot: Annotated[Optional[list[Path]], typer.Option(
        "-s", "--snapshot", metavar="IMAGE", help="A VM restored from this image. Repeat for "
        "more.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="A VMM configuration file (key=value lines; see the README).")]
    = None,
    slice_ms: SliceOption = None,
    memory: Annotated[Optional[str], typer.Option(
        help="Memory of every VM started from a program (overrides the file).")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Root directory of every VM (overrides the file).")] = None,
    control: ControlOption = None,
    cpu: CpuOption = "auto",
):
    """Run several VMs in one VMM, round-robin in time slices on one thread; exit when all
    have ended, with the largest of their exit statuses (a fault counts 128 + signal).

    Each VM has its own memory, vCPU, root, open files and exit status; with several VMs
    their output lines are tagged [NAME] and their stdin is /dev/null; a SAVE writes
    NAME.sav. Example: vmstate host -v "examples/hello a b" -v examples/lab_app -s saved.sav
    """
    from kvm_backend.host import run_hosted

    from .vmm_config import HostConfig, complete, load, refuse_shared_images, with_command_line
    settings = with_command_line(
        load(str(config)) if config is not None else HostConfig(), vm or [],
        [str(path) for path in snapshot or []], slice_ms=slice_ms, memory=memory,
        root=None if root is None else str(root), control=None if control is None else str(control))
    if not settings.vms:
        _fail("host needs at least one VM: -v PROGRAM, -s IMAGE or --config FILE", 2)
    entries = complete(list(settings.vms), settings.defaults)
    refuse_shared_images(entries)
    host = run_hosted(entries, settings.slice_ms, settings.control, cpu=cpu,
                      slice_instructions=settings.slice_instructions)
    print(host.summary(), file=sys.stderr)
    raise typer.Exit(host.exit_status())


@app.command()
def ctl(
    path: Annotated[Path, typer.Argument(metavar="SOCKET", help="A VMM's --control socket.")],
    command: Annotated[str, typer.Argument(help="query-vms, stop, cont, dump-state, snapshot, "
                                           "save, migrate or quit.")],
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="[VM] [KEY=VALUE]...", help="The VM's name, then arguments (path=..., "
        "address=HOST:PORT).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the reply line as JSON.")]
    = False,
):
    """Send one command to a VMM's control socket and print the reply.

    Example: vmstate ctl vmm.sock snapshot web path=web-1.sav
    """
    import json

    from .ctl import arguments_from, render, request
    reply = request(str(path), command, arguments_from(list(args or [])))
    if json_output:
        print(json.dumps(reply))
    if "error" in reply:
        if not json_output:
            _fail(f"ctl {command}: {reply['error'].get('desc', reply['error'])}", EXIT_ERROR)
        raise typer.Exit(EXIT_ERROR)
    if not json_output:
        print(render(reply))


@app.command()
def info(
    image_file: Annotated[Path, typer.Argument(metavar="IMAGE", help="A saved VM image or "
                                               "QEMU migration stream.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the data as JSON.")] = False,
    instructions: Annotated[int, typer.Option(help="How many instructions to disassemble.")] = 8,
):
    """Show what a saved VM holds (a vmstate image or a QEMU migration stream): registers,
    memory, devices; for images also MSRs, open files, next instructions.

    Checks every checksum first (memory included). Works without KVM.
    Example: vmstate info --json vm_image.sav
    """
    _in_range("--instructions", instructions, 0, MAX_INSTRUCTIONS)
    from .formats.registry import detect
    print(detect(str(image_file)).info(str(image_file), json_output, instructions))


DEFAULT_CORE, DEFAULT_XML = "vm.core", "hw.xml"    # as vmstate.split (not imported: start-up time)


@app.command()
def send(
    image_file: Annotated[Path, typer.Argument(metavar="IMAGE", help="A saved VM image.")],
    address: Annotated[str, typer.Argument(metavar="HOST:PORT", help="A `vmstate receive`.")],
    with_files: WithFilesOption = False,
    root: RootOption = Path("."),
    connect_timeout: ConnectTimeoutOption = 30.0,
):
    """Send IMAGE to a receiver; succeeds only once the receiver has verified and kept it.

    Example: vmstate send vm_image.sav otherhost:4040
    """
    from .migration.send import send_image
    target = _address("HOST:PORT", address)
    _in_range("--connect-timeout", connect_timeout, 0, 1e9)
    message = send_image(str(image_file), target, with_files, str(root), connect_timeout)
    print(f"vmstate: sent {image_file} to {address}: {message}", file=sys.stderr)


@app.command()
def receive(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 4040,
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    root: RootOption = Path("."),
    run: Annotated[bool, typer.Option("--run", help="Resume each VM received at once.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Store the VM "
                                                   "received as this image.")] = None,
    once: Annotated[bool, typer.Option(help="Stop after one sender.")] = False,
    max_size: Annotated[str, typer.Option(help="Refuse images larger than this.")] = "64G",
    min_rate: Annotated[str, typer.Option(help="Drop a sender slower than this many bytes a "
                                          "second (after a 3 s start).")] = "1M",
    max_senders: Annotated[int, typer.Option(help="Senders served at once with -o, 1 to 64 "
                                             "(the others wait); --run serves one.")] = 4,
    trace: TraceOption = False,
    image: ImageOption = Path(DEFAULT_IMAGE),
    cpu: CpuOption = "auto",
):
    """Wait for VMs sent by `vmstate run --migrate-to`, `restore --migrate-to` or `send`;
    verify each, then run it (--run) or store it (-o IMAGE). A bad stream is logged in one
    line and the next sender is served (unless --once).

    Example: vmstate receive --port 4040 --root /srv/guest --run
    """
    if run == (output is not None):
        _fail("receive needs exactly one of --run or -o IMAGE", 2)
    _in_range("--port", port, 0, MAX_PORT)
    _in_range("--max-senders", max_senders, 1, 64)
    size_limit, rate = _size("--max-size", max_size), _size("--min-rate", min_rate)
    if not root.is_dir():
        _fail(f"--root {root}: not a directory", EXIT_ERROR)
    if run:
        from kvm_backend.session import SaveOptions, receive_and_run
        outcome = receive_and_run((bind, port), str(root), size_limit, rate, once,
                                  SaveOptions(str(image)), trace=sys.stderr if trace else None,
                                  cpu=cpu)
        if once:
            if outcome is None:
                raise typer.Exit(EXIT_ERROR)
            _finish(outcome)
        return
    from .migration.receive import serve, store_received
    failures = serve(bind, port, lambda connection: store_received(
        connection, str(root), str(output), size_limit), once, rate, max_senders)
    raise typer.Exit(EXIT_ERROR if failures else 0)


@app.command()
def split(
    image_file: Annotated[Path, typer.Argument(metavar="IMAGE", help="A saved VM image.")],
    core: Annotated[Path, typer.Option(help="The ELF core to write (memory).")] = Path(DEFAULT_CORE),
    xml: Annotated[Path, typer.Option(help="The XML to write (hardware state).")] = Path(DEFAULT_XML),
):
    """Split IMAGE (a vmstate image or a QEMU migration stream) into an ELF core for gdb
    (memory) and an XML file (hardware state).

    Example: vmstate split vm_image.sav && gdb examples/lab_app vm.core
    """
    from .atomic import refuse_clobbering
    from .formats.registry import detect
    refuse_clobbering({"--core": str(core), "--xml": str(xml)}, {"the image": str(image_file)})
    message = detect(str(image_file)).split(str(image_file), str(core), str(xml))
    print(f"vmstate: {message}", file=sys.stderr)


@app.command()
def join(
    core: Annotated[Path, typer.Argument(metavar="CORE", help="The ELF core from split (gdb may "
                                         "have edited it).")],
    xml: Annotated[Path, typer.Argument(metavar="XML", help="The hardware-state XML from split "
                                        "(edited or not).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="The new image.")] = None,
    app_program: Annotated[Optional[Path], typer.Option("--app", help="The guest program, to name "
                                                        "symbols in changed pages.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print what changed; write nothing.")] = False,
):
    """Rebuild an image (or a QEMU stream) from CORE (memory) and XML (registers, MSRs,
    devices, files).

    The XML is validated against its schema in schemas/; the summary of what changed goes
    to stdout. Example: vmstate join vm.core hw.xml -o new.sav
    """
    from .formats.registry import for_xml_root
    from .hwxml import parse_xml
    if output is None and not dry_run:
        _fail("join needs -o NEW.sav (or --dry-run)", 2)
    if output is not None:
        from .atomic import refuse_clobbering
        inputs = {"the core": str(core), "the XML": str(xml)}
        if app_program:
            inputs["--app"] = str(app_program)
        refuse_clobbering({"-o": str(output)}, inputs)
    xml_data = _read_input(xml)
    chosen = for_xml_root(parse_xml(xml_data, str(xml)).tag, str(xml))
    symbols = None
    if app_program:
        from .symbols import Symbols
        symbols = Symbols(str(app_program))
    print(chosen.join(str(core), str(xml), xml_data, None if dry_run else str(output), symbols))
    if not dry_run:
        print(f"vmstate: wrote {output}", file=sys.stderr)


@app.command(context_settings={"allow_interspersed_args": False})
def gdb(
    target: Annotated[Path, typer.Argument(metavar="IMAGE|CORE", help="An image (split first) "
                                           "or a core from split.")],
    gdb_args: Annotated[Optional[list[str]], typer.Argument(help="More gdb arguments "
                                                            "(e.g. -batch -ex bt).")] = None,
    app_program: Annotated[Optional[Path], typer.Option("--app", help="The guest program "
                                                        "(default: the one recorded).")] = None,
):
    """Open gdb in write mode on a core, with the program's symbols loaded by symbol-file
    (so no write can land in the program file). An IMAGE is split first into vm.core and
    hw.xml. Example: vmstate gdb vm_image.sav -- -batch -ex bt
    """
    from .gdb import run_gdb
    extra = list(gdb_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    run_gdb(str(target), str(app_program) if app_program else None, extra)


def _check_save_options(migrate_to: str | None, connect_timeout: float,
                        max_downtime: float) -> None:
    if migrate_to is not None:
        _address("--migrate-to", migrate_to)
    _in_range("--connect-timeout", connect_timeout, 0, 1e9)
    if not 0 < max_downtime <= 60_000:
        raise UsageError(f"--max-downtime {max_downtime:g}: must be more than 0 and at most "
                         "60000 ms")


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileMissingError(f"{path}: no such file") from None


def _finish(outcome) -> None:
    from machine.outcome import Exited, Faulted, Saved
    if isinstance(outcome, Exited):
        raise typer.Exit(outcome.status)
    if isinstance(outcome, Saved):
        print(f"vmstate: VM {outcome.where}", file=sys.stderr)
        raise typer.Exit(0)
    if isinstance(outcome, Faulted):
        _fail(outcome.report, EXIT_SIGNAL_BASE + outcome.signal)
    _fail(outcome.report, outcome.status)        # ended by a control `quit` or a VMM error


def _app_for(arguments: list[str]) -> typer.Typer:
    """The app that parses `arguments`: for a command named first, a copy of `app` that holds
    that command alone (typer builds the click command of every registered command, options
    and help included, each time it is called; the others are not needed to run one)."""
    from copy import copy

    from typer.main import get_command_name
    chosen = [command for command in app.registered_commands if arguments[:1] == [
        command.name or get_command_name(command.callback.__name__)]]
    if not chosen:
        return app                              # --help, completion, a mistyped command
    lean = copy(app)
    lean.registered_commands = chosen
    return lean


def main() -> None:
    for stream in (sys.stdout, sys.stderr):      # an ASCII locale must not end in a traceback
        stream.reconfigure(errors="backslashreplace")
    try:
        _run(sys.argv[1:])
    except SystemExit as e:
        _exit(e.code)
    _exit(0)


def _run(arguments: list[str]) -> None:
    """The command; its errors become one line and an exit status (SystemExit)."""
    try:
        status = _app_for(arguments)(standalone_mode=False)
    except typer.Abort:
        print("vmstate: aborted", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except typer.TyperException as e:     # click's usage errors: bad option values, unknown options
        _usage_error(e)
    except VmstateError as e:
        print(f"vmstate: {shorten_message(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("vmstate: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_ERROR)
    except OSError as e:     # I/O outside the formats' own checks: disk full, permissions
        print(f"vmstate: {shorten_message(describe_error(e))}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Exception as e:  # a bug in vmstate: one line, the traceback only on request
        if os.environ.get("VMSTATE_DEBUG"):
            raise
        print(f"vmstate: {shorten_message(f'internal error: {type(e).__name__}: {e}')} (set "
              "VMSTATE_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(status if isinstance(status, int) else 0)     # typer.Exit's status, or 0


def _usage_error(e) -> None:
    """A command-line mistake click found, as one line (click prints the usage and the error
    over three or four); the help text when no arguments were given."""
    message = e.format_message()
    if "\n" in message:                  # no arguments at all: click's error is the help
        e.show()
    else:
        ctx = getattr(e, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"vmstate: {shorten_message(message)}{where}", file=sys.stderr)
    sys.exit(e.exit_code)


def _silence_stdout() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _exit(code) -> None:
    """End the process with SystemExit's `code` as soon as stdout and stderr are flushed,
    without the interpreter's teardown of its modules (15-20 ms of every command here):
    vmstate registers no exit handler and closes the files it writes itself. While a thread
    that is not a daemon still runs, or under a profiler or tracer (which write their
    results at exit), the interpreter's own exit is taken instead."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:                                        # as the interpreter does with sys.exit("...")
        print(code, file=sys.stderr)
        status = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        status = EXIT_ERROR
    sys.stderr.flush()
    import threading
    if sys.getprofile() or sys.gettrace() or any(
            not thread.daemon and thread.is_alive() for thread in threading.enumerate()
            if thread is not threading.current_thread()):
        sys.exit(status)
    os._exit(status)
