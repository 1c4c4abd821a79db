"""The control commands a Host serves between time slices (the requests of control.py;
the protocol is specified in schemas/control-protocol.md). Each takes the host and the
request's arguments and returns the reply's value, or raises CommandError."""

from __future__ import annotations

from typing import Callable

from vmstate.errors import UsageError

from .host import EXIT_QUIT, AwaitHandOver, CommandError, Host, HostedVm, Stopped
from .session import save_to_file

MAX_CONNECT_TIMEOUT = 1e9          # seconds, as the command line's --connect-timeout


def _argument(arguments: dict, name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value:
        raise CommandError(f"argument {name!r} (a string) is needed")
    return _without_nul(name, value)


def _without_nul(name: str, value: str) -> str:
    if "\0" in value:
        raise CommandError(f"argument {name!r} holds a NUL character")
    return value


def _number(arguments: dict, name: str, default: float, high: float) -> float:
    """A JSON number from 0 to `high` (a client's string or true is not one)."""
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise CommandError(f"argument {name!r} must be a number from 0 to {high:g}")
    return float(value)


def _query_vms(host: Host, arguments: dict) -> list[dict]:
    return [{"name": h.name, "state": h.state_name(), "description": h.describe(),
             "program": h.vm.program, "argv": list(h.vm.argv), "root": h.entry.root,
             "snapshot": h.entry.snapshot, "exit_status": h.status() if h.ended else None,
             "slices": h.slices, "run_seconds": round(h.run_ns / 1e9, 6)} for h in host.vms]


def _stop(host: Host, arguments: dict) -> dict:
    host.find(arguments).running = False
    return {}


def _cont(host: Host, arguments: dict) -> dict:
    host.find(arguments).running = True
    return {}


def _dump_state(host: Host, arguments: dict) -> dict:
    hosted = host.find(arguments)
    hosted.vm.pause()
    from machine.paracalls import ParaCalls
    return {"text": ParaCalls(hosted.vm).dump_text(settle=False)}


def _snapshot(host: Host, arguments: dict) -> dict:
    hosted, path = host.find(arguments), _argument(arguments, "path")
    _refuse_over_program(hosted, path)
    hosted.vm.pause()
    from vmstate.image.writer import write_image
    write_image(path, hosted.vm.capture(), [hosted.vm.memory.view])
    return {"path": path}


def _save(host: Host, arguments: dict) -> dict:
    hosted = _not_handing_over(host.find(arguments))
    path = arguments.get("path") or hosted.entry.image
    if not isinstance(path, str):
        raise CommandError("argument 'path' must be a string")
    _refuse_over_program(hosted, _without_nul("path", path))
    hosted.vm.pause()
    outcome = hosted.vm.save_now(save_to_file(path))
    host.end(hosted, outcome)
    return {"path": path, "description": outcome.where}


def _migrate(host: Host, arguments: dict) -> dict:
    hosted, address = _not_handing_over(host.find(arguments)), _argument(arguments, "address")
    timeout = _number(arguments, "connect_timeout", 5, MAX_CONNECT_TIMEOUT)
    from vmstate.migration.protocol import parse_address
    target = parse_address(address)
    if arguments.get("live"):
        return _migrate_live(hosted, target, address, timeout, arguments)
    hosted.vm.pause()
    from machine.live import ColdSend
    hosted.vm.send_away(ColdSend(hosted.vm, target, timeout,
                                 bool(arguments.get("with_files", False)), hosted.entry.root))
    return AwaitHandOver(hosted)


def _migrate_live(hosted, target, address: str, timeout: float, arguments: dict) -> dict:
    """Pre-copy while the VM runs on in its slices; the host ends it once it is handed over
    (or it runs on here if the migration fails, which the VMM's stderr says)."""
    max_downtime = _number(arguments, "max_downtime_ms", 50, 60_000)
    if max_downtime == 0:
        raise CommandError("argument 'max_downtime_ms' must be a number from 0 to 60000")
    from vmstate.migration.live_send import LiveOptions
    from machine.live import live_migrate_to
    hosted.vm.begin_live_migration(live_migrate_to(
        target, timeout,
        bool(arguments.get("with_files", False)), hosted.entry.root,
        LiveOptions(max_downtime / 1000)))
    return {"description": f"live migration to {address} begins; the VM runs on until the "
                           "receiver has it"}


def _quit(host: Host, arguments: dict) -> dict:
    host.quitting = True
    for hosted in host.vms:
        if not hosted.ended:
            host.end(hosted, Stopped("ended by quit", EXIT_QUIT))
    return {}


def _not_handing_over(hosted: HostedVm) -> HostedVm:
    """A VM handing over to a migration receiver may be running there already: it is not
    saved or sent elsewhere until the receiver has answered."""
    if hosted.vm.handing_over is not None:
        raise CommandError(f"VM {hosted.name} is handing over to a migration receiver (which "
                           "has not answered yet)")
    return hosted


def _refuse_over_program(hosted: HostedVm, path: str) -> None:
    from vmstate.atomic import refuse_clobbering
    inputs = {"the program": hosted.vm.program}
    if hosted.entry.snapshot:
        inputs = {}       # saving over the image a VM was restored from is how it is saved again
    try:
        refuse_clobbering({"path": path}, inputs)
    except UsageError as e:
        raise CommandError(str(e)) from None


COMMANDS: dict[str, Callable[[Host, dict], object]] = {
    "query-vms": _query_vms, "stop": _stop, "cont": _cont, "dump-state": _dump_state,
    "snapshot": _snapshot, "save": _save, "migrate": _migrate, "quit": _quit}
