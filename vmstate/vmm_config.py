"""The VMM configuration file of `vmstate host --config FILE`: which VMs one VMM runs and how.

    # comments and blank lines are ignored; a line is KEY = VALUE
    vm_exec_slice_ms = 10              # round-robin time slice of each vCPU
    control = /run/vmm.sock            # the control socket (see `vmstate ctl`)
    vm_memory = 64M                    # per-VM keys before the first VM: defaults for all
    vm_binary = examples/hello a b     # starts a VM: program and arguments (shell quoting)
    vm_root = /srv/guest               # per-VM keys after it apply to that VM
    vm_snapshot = saved.sav            # starts a VM from an image

An unknown key, a bad value, or a per-VM key given twice for one VM is refused with the file
name and line number. Relative paths are taken from the VMM's working directory.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace

from .errors import UsageError, VmstateError
from .units import parse_size
from .validate import MAX_MEMORY, MIN_MEMORY

DEFAULT_SLICE_MS = 10
MAX_SLICE_MS = 60_000
DEFAULT_MEMORY = 64 << 20


@dataclass(frozen=True)
class VmEntry:
    """One VM to start: a program with its argv, or a snapshot image."""
    program: str | None = None
    argv: tuple[str, ...] = ()
    snapshot: str | None = None
    name: str | None = None            # default: the program's or image's file name
    root: str | None = None            # default: "."
    memory: int | None = None          # default: 64 MiB (a snapshot has its own size)
    image: str | None = None           # where a SAVE writes; default NAME.sav
    where: str = ""                    # "FILE:LINE" or "-v"/"-s", for messages

    @classmethod
    def for_program(cls, command: str, where: str) -> VmEntry:
        try:
            argv = tuple(shlex.split(command))
        except ValueError as e:
            raise UsageError(f"{where}: {command!r}: {e}") from None
        if not argv:
            raise UsageError(f"{where}: no program given")
        return cls(program=argv[0], argv=argv, where=where)


@dataclass(frozen=True)
class HostConfig:
    slice_ms: int = DEFAULT_SLICE_MS
    slice_instructions: int | None = None
    control: str | None = None
    vms: tuple[VmEntry, ...] = ()
    defaults: VmEntry = field(default_factory=VmEntry)   # per-VM keys before the first VM


def parse_slice_ms(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise VmstateError(f"{text!r} is not a whole number of milliseconds") from None
    if not 1 <= value <= MAX_SLICE_MS:
        raise VmstateError(f"{value} ms is not between 1 and {MAX_SLICE_MS}")
    return value


def parse_memory(text: str) -> int:
    value = parse_size(text)
    if not MIN_MEMORY <= value <= MAX_MEMORY:
        raise VmstateError(f"memory {text} is not between {MIN_MEMORY >> 20} MiB and "
                           f"{MAX_MEMORY >> 30} GiB")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise VmstateError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise VmstateError(f"{value} is not positive")
    return value


def _nonempty(text: str) -> str:
    if not text:
        raise VmstateError("empty value")
    return text


def _name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise VmstateError(f"VM name {text!r}: use letters, digits, '-', '_' and '.'")
    return text


HOST_KEYS = {"vm_exec_slice_ms": ("slice_ms", parse_slice_ms),
             "vm_exec_slice_in_instructions": ("slice_instructions", _positive_int),
             "control": ("control", _nonempty)}
VM_KEYS = {"vm_root": ("root", _nonempty), "vm_memory": ("memory", parse_memory),
           "vm_name": ("name", _name), "vm_image": ("image", _nonempty)}
VM_STARTS = ("vm_binary", "vm_snapshot")


def parse(text: str, filename: str) -> HostConfig:
    config, current = HostConfig(), None
    vms: list[VmEntry] = []
    seen_host: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{filename}:{number}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise UsageError(f"{where}: a NUL character (no path, command or name can hold one)")
        key, equals, value = (part.strip() for part in line.partition("="))
        if not equals:
            raise UsageError(f"{where}: expected KEY = VALUE, got {line!r}")
        if " #" in value:                             # a comment after the value
            value = value[:value.index(" #")].rstrip()
        try:
            if key in VM_STARTS:
                current = (VmEntry.for_program(value, where) if key == "vm_binary"
                           else VmEntry(snapshot=_nonempty(value), where=where))
                vms.append(current)
            elif key in VM_KEYS:
                attribute, parse_value = VM_KEYS[key]
                target = current if current is not None else config.defaults
                if getattr(target, attribute) is not None:
                    raise VmstateError(f"{key} given twice for " +
                                       (f"the VM of {target.where}" if current else "defaults"))
                updated = replace(target, **{attribute: parse_value(value)})
                if current is None:
                    config = replace(config, defaults=updated)
                else:
                    current = vms[-1] = updated
            elif key in HOST_KEYS:
                if key in seen_host:
                    raise VmstateError(f"{key} given twice")
                seen_host.add(key)
                attribute, parse_value = HOST_KEYS[key]
                config = replace(config, **{attribute: parse_value(value)})
            else:
                known = ", ".join(sorted([*HOST_KEYS, *VM_KEYS, *VM_STARTS]))
                raise VmstateError(f"unknown key {key!r} (known: {known})")
        except VmstateError as e:
            message = str(e).removeprefix(f"{where}: ")
            raise UsageError(f"{where}: {message}") from None
    return replace(config, vms=tuple(vms))


def load(path: str) -> HostConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        from .errors import FileMissingError
        raise FileMissingError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read: {getattr(e, 'strerror', None) or e}") \
            from None
    return parse(text, path)


def with_command_line(config: HostConfig, programs: list[str], snapshots: list[str], *,
                      slice_ms: int | None = None, memory: str | None = None,
                      root: str | None = None, control: str | None = None) -> HostConfig:
    """The file's settings with the command line's on top: its VMs (-v, -s) added after the
    file's, its options replacing the file's (--memory and --root for every VM)."""
    vms = [*config.vms, *(VmEntry.for_program(command, "-v") for command in programs),
           *(VmEntry(snapshot=path, where="-s") for path in snapshots)]
    overrides = {}
    if memory is not None:
        overrides["memory"] = _option("--memory", parse_memory, memory)
    if root is not None:
        overrides["root"] = root
    return replace(config, vms=tuple(replace(vm, **overrides) for vm in vms),
                   slice_ms=config.slice_ms if slice_ms is None else
                   _option("--slice-ms", parse_slice_ms, str(slice_ms)),
                   control=config.control if control is None else control)


def _option(option: str, parse_value, text: str):
    try:
        return parse_value(text)
    except VmstateError as e:
        raise UsageError(f"{option}: {e}") from None


def refuse_shared_images(entries: list[VmEntry]) -> None:
    """No two VMs save to one image, and none over a program or another VM's snapshot (a VM
    may save over the image it was restored from, as `restore` does)."""
    from .atomic import refuse_clobbering
    programs = {f"the program of {e.name}": e.program for e in entries if e.program}
    refuse_clobbering({f"the image of {e.name}": e.image for e in entries}, programs)
    for entry in entries:
        others = {f"the snapshot of {e.name}": e.snapshot for e in entries
                  if e.snapshot and e is not entry}
        refuse_clobbering({f"the image of {entry.name}": entry.image}, others)


def complete(entries: list[VmEntry], defaults: VmEntry) -> list[VmEntry]:
    """Fill each VM's unset fields from `defaults`, then the built-in defaults; give each a
    unique name (the file name, then -2, -3 ...)."""
    done, taken = [], set()
    for entry in entries:
        base = entry.name or defaults.name or _file_stem(entry.program or entry.snapshot)
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        done.append(replace(
            entry, name=name, root=entry.root or defaults.root or ".",
            memory=entry.memory or defaults.memory or DEFAULT_MEMORY,
            image=entry.image or f"{name}.sav"))
    return done


def _file_stem(path: str) -> str:
    stem = path.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.removesuffix(".sav")
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return cleaned or "vm"
