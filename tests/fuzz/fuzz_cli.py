"""Mutation fuzzing of vmstate's inputs through its own CLI entry point (in-process, for speed).

Not part of the default test run. Usage, from the worktree:

    .venv/bin/python tests/fuzz/fuzz_cli.py TARGET SEED COUNT WORKDIR

TARGET is `xml` (hw.xml edited, then `join -o`), `state` (the image's decoded state
edited and re-encoded by vmstate.image.writer, then `info` and `split`), `restore` (as
`state`, then `vmstate restore` in a process of its own, 30 s at most), `qemu-desc` (a
value of a QEMU stream's JSON description changed, then `info` and `split`), `qemu-xml` (as `xml`,
for a QEMU stream's split), or one of BYTE_TARGETS (bit flips and truncations: `bytes` for the
image, `core`, `qemu` for the stream, `qemu-core`). WORKDIR must hold vm_image.sav, vm.core and
hw.xml (`vmstate run examples/lab_app && vmstate split vm_image.sav`), and for the QEMU targets
WORKDIR/qemu/pc.state, vm.core and hw.xml (`python examples/qemu_vm.py save pc.state --memory
32M`, then `vmstate split pc.state`). Seeded and bounded: the same
SEED and COUNT make the same inputs. Every run that ends in a traceback or an "internal error"
line is printed with the input that caused it, saved as WORKDIR/finding-N.*.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

HOSTILE_TEXT = ["0", "-1", "0x", "0xffffffffffffffff", "0x10000000000000000",
                "99999999999999999999999999", "1e9", "abc", "", " ", "\x01", "\x7f",
                "é", "0x" + "f" * 40, "nan", "inf", "-0x1", "0b1", "1_000", "٣",
                "a" * 5000, "../../etc/passwd", "/", "true", "0" * 300 + "1"]
HOSTILE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64,
                4096, 4095, 2**40, 2**52 + 1]


def run_cli(arguments: list[str]) -> tuple[int, str]:
    """`vmstate ARGUMENTS` in this process: (exit status, stderr)."""
    from vmstate import cli
    err, out = io.StringIO(), io.StringIO()
    status = 0
    sys.argv = ["vmstate", *arguments]            # typer parses sys.argv
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli._run(arguments)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a traceback is what we hunt
            import traceback
            return -1, f"TRACEBACK {type(e).__name__}: {e}\n{traceback.format_exc()}"
    return status, err.getvalue()


def run_command(arguments: list[str]) -> tuple[int, str]:
    """`vmstate ARGUMENTS` in a process of its own (a restored guest may never end)."""
    command = [str(Path(sys.executable).parent / "vmstate"), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return 0, ""                   # the guest runs on: not the VMM's error
    stderr = done.stderr.decode(errors="replace")
    return (-1 if "Traceback" in stderr else done.returncode), stderr


def is_defect(status: int, stderr: str) -> bool:
    return status == -1 or "internal error" in stderr


def mutate_xml(data: bytes, rng: random.Random) -> bytes:
    from lxml import etree
    root = etree.fromstring(data)
    elements = list(root.iter())
    for _ in range(rng.choice((1, 1, 2, 3))):
        element = rng.choice(elements)
        action = rng.random()
        if action < 0.6 and element.attrib:
            name = rng.choice(list(element.attrib))
            element.set(name, rng.choice(HOSTILE_TEXT).replace("\x01", "x")
                        if rng.random() < 0.3 else _hostile_number(rng))
        elif action < 0.7 and element.getparent() is not None:
            element.getparent().remove(element)
        elif action < 0.8 and element.getparent() is not None:
            element.addnext(etree.fromstring(etree.tostring(element)))
        elif action < 0.9 and element.text and element.text.strip():
            element.text = rng.choice(HOSTILE_TEXT).replace("\x01", "x").replace("\x7f", "x")
        elif element.attrib:
            del element.attrib[rng.choice(list(element.attrib))]
        elements = list(root.iter())
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


BYTE_TARGETS = {      # target: (input under WORKDIR, its name when mutated, commands run on it)
    "bytes": ("vm_image.sav", "fuzz.sav", [["info", "INPUT"]]),
    "core": ("vm.core", "fuzz.core", [["join", "INPUT", "hw.xml", "--dry-run"]]),
    "qemu": ("qemu/pc.state", "fuzz.state", [["info", "INPUT"], ["split", "INPUT"]]),
    "qemu-core": ("qemu/vm.core", "fuzz.core", [["join", "INPUT", "qemu/hw.xml", "--dry-run"]]),
}


def mutate_file(source: Path, path: Path, rng: random.Random) -> None:
    """A sparse copy of `source` with bit flips or words set to hostile values, mostly where
    the headers and descriptions are; or a truncation."""
    subprocess.run(["cp", "--sparse=always", str(source), str(path)], check=True)
    size = path.stat().st_size
    if rng.random() < 0.25:
        os.truncate(path, rng.randrange(size))
        return
    with open(path, "r+b") as f:
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(size if rng.random() < 0.3 else min(size, 16384))
            f.seek(at)
            if rng.random() < 0.7:
                byte = f.read(1)[0] ^ (1 << rng.randrange(8))
                f.seek(at)
                f.write(bytes([byte]))
            else:
                f.write((rng.choice(HOSTILE_INTS[:12]) % (1 << 64)).to_bytes(8, "little"))


def mutate_description(stream: bytes, rng: random.Random) -> bytes:
    """The stream with one value of its JSON description (at its end) set to a hostile one."""
    import json
    import struct
    marker = stream.rfind(b"\x06")
    description = json.loads(stream[marker + 5:])
    node, key = description if rng.random() < 0.1 else description["devices"], None
    while True:
        keys = list(range(len(node))) if isinstance(node, list) else list(node)
        if not keys:
            break
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.15:
            break
        node = node[key]
    if key is not None:
        node[key] = rng.choice([0, -1, 2**64, 10**12, "x", None, True, [], {}, [1], {"a": 1},
                                1.5, "", "struct"])
    text = json.dumps(description).encode()
    return stream[:marker + 1] + struct.pack(">I", len(text)) + text


def _hostile_number(rng: random.Random) -> str:
    value = rng.choice(HOSTILE_INTS)
    return rng.choice((hex(value), str(value)))


def mutate_state(state, rng: random.Random):
    """One field somewhere in the state set to a hostile value of its type."""
    path = []
    node = state
    while True:
        if is_dataclass(node):
            names = [f.name for f in fields(node)]
            if not names:
                break
            name = rng.choice(names)
            path.append(name)
            child = getattr(node, name)
            if isinstance(child, (int, str, bytes)) or child is None or rng.random() < 0.1:
                return _set(state, path, _hostile_like(child, rng))
            node = child
        elif isinstance(node, tuple):
            if not node:
                break
            index = rng.randrange(len(node))
            path.append(index)
            child = node[index]
            if rng.random() < 0.15:
                return _set(state, path[:-1], node + (child,))       # a duplicate
            if isinstance(child, (int, str, bytes)):
                return _set(state, path, _hostile_like(child, rng))
            node = child
        else:
            break
    return state


def _hostile_like(value, rng: random.Random):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice(HOSTILE_INTS[:12] if rng.random() < 0.9 else [value ^ 1])
    if isinstance(value, str):
        return rng.choice(["", "\x01", "é", "a" * 300, "/", "..", "\udcff", "x\0y"])
    if isinstance(value, bytes):
        return rng.choice([b"", value[:-1], value + b"\0", b"\xff" * len(value)])
    if isinstance(value, tuple):
        return rng.choice([(), value[:-1], value + value[-1:] if value else ()])
    return value


def _set(node, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, tuple):
        return node[:head] + (_set(node[head], rest, value),) + node[head + 1:]
    return replace(node, **{head: _set(getattr(node, head), rest, value)})


def fuzz(target: str, seed: int, count: int, workdir: Path) -> int:
    rng = random.Random(seed)
    scratch = workdir / f"scratch-{target}-{seed}"
    scratch.mkdir(exist_ok=True)
    os.chdir(scratch)
    xml = (workdir / "hw.xml").read_bytes()
    findings = 0
    seen = set()
    for case in range(count):
        for leftover in scratch.iterdir():
            leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)
        if target == "xml":
            path = scratch / "hw.xml"
            path.write_bytes(mutate_xml(xml, rng))
            runs = [["join", str(workdir / "vm.core"), str(path), "-o", str(scratch / "out")]]
        elif target in ("state", "restore"):
            from vmstate.image.reader import Image
            from vmstate.image.writer import write_image
            path = scratch / "fuzz.sav"
            with Image(str(workdir / "vm_image.sav")) as image:
                state = mutate_state(image.state, rng)
                try:
                    write_image(str(path), state, [image.region_view(i)
                                                   for i in range(len(state.memory))]
                                if len(state.memory) == len(image.state.memory) else
                                [image.region_view(0)] * len(state.memory), durable=False)
                except Exception:  # noqa: BLE001 - the writer refused the value: no input
                    continue
            runs = ([["info", str(path)], ["split", str(path)]] if target == "state"
                    else [["restore", str(path)]])
        elif target == "qemu-desc":
            path = scratch / "fuzz.state"
            path.write_bytes(mutate_description((workdir / "qemu" / "pc.state").read_bytes(),
                                                rng))
            runs = [["info", str(path)], ["split", str(path)]]
        elif target == "qemu-xml":
            path = scratch / "hw.xml"
            path.write_bytes(mutate_xml((workdir / "qemu" / "hw.xml").read_bytes(), rng))
            runs = [["join", str(workdir / "qemu" / "vm.core"), str(path), "-o",
                     str(scratch / "out")]]
        else:
            source, name, commands = BYTE_TARGETS[target]
            path = scratch / name
            mutate_file(workdir / source, path, rng)
            runs = [[*(str(path) if word == "INPUT" else str(workdir / word) if "/" in word
                       or word.endswith((".core", ".xml")) else word for word in command)]
                    for command in commands]
        for arguments in runs:
            status, stderr = (run_command if target == "restore" else run_cli)(arguments)
            if status and (scratch / "out").exists():
                stderr = f"output written by a run that failed: {stderr}"
                status = -1
            if is_defect(status, stderr):
                key = stderr.splitlines()[0][:120] if stderr else "?"
                if key in seen:
                    continue
                seen.add(key)
                findings += 1
                kept = workdir / f"finding-{target}-{seed}-{findings}{path.suffix}"
                shutil.copy(path, kept)
                print(f"case {case}: {' '.join(arguments[:1])}: {stderr.strip()[:2000]}\n"
                      f"  input kept as {kept}", flush=True)
    print(f"{target}: {count} cases, {findings} distinct findings", flush=True)
    return findings


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]).resolve())
