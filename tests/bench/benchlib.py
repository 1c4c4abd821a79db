"""Helpers for the benchmarks: wall-clock medians of whole commands, and a report printer.
Benchmarks print figures against a baseline measured in the same run; they assert nothing
about time."""

from __future__ import annotations

import os
import statistics
import subprocess
import time


def median_seconds(command: list[str], runs: int = 7, **kwargs) -> float:
    """Median wall time of a whole command (process start to exit), after one warm-up run."""
    subprocess.run(command, check=True, capture_output=True, **kwargs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(commands: dict[str, list[str]], runs: int = 11, **kwargs
                        ) -> dict[str, float]:
    """Median wall time of each whole command, after one warm-up run of each. A round runs
    every command once (in reverse order every other round), so a change in the machine's load
    during the measurement reaches all of them alike, and ratios between them hold."""
    for command in commands.values():
        subprocess.run(command, check=True, capture_output=True, **kwargs)
    times: dict[str, list[float]] = {name: [] for name in commands}
    order = list(commands.items())
    for round_ in range(runs):
        for name, command in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, **kwargs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n== {title}")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")


def warm_up_memory(gib: int = 8) -> None:
    """Touch `gib` GiB of anonymous memory once, then free it.

    These machines are microVMs whose memory is backed lazily by their host: the first touch
    of a page the kernel has never used costs ~20 us (measured 0.18 GiB/s), later ones cost
    memcpy speed. Page cache and guest memory come from the same free pages, so without this
    whichever command happens to get recycled pages looks faster."""
    import mmap
    areas, piece = [], b"\1" * (1 << 20)
    for _ in range(gib):           # all held at once, so that they are all different pages
        area = mmap.mmap(-1, 1 << 30)
        for offset in range(0, 1 << 30, len(piece)):
            area[offset:offset + len(piece)] = piece
        areas.append(area)
    for area in areas:
        area.close()


# The four memory layouts every memory benchmark measures, as arguments of
# examples/fill_memory for a guest of `memory_mib`: a contiguous quarter of memory, and over a
# buffer as large as memory allows (all of it but the program, stack and heap bookkeeping):
# one page in four, a quarter of the pages at random, every page.
LAYOUTS = ("contiguous quarter", "every 4th page", "25% random pages", "fully written")
# VMSTATE_BENCH_SIZES=1024 limits the matrix to one guest size (the 4 GiB runs take most of
# the time on a busy disk).
SIZES_MIB = tuple(int(size) for size in os.environ.get("VMSTATE_BENCH_SIZES", "1024,4096")
                  .split(","))


def fill_arguments(layout: str, memory_mib: int) -> list[str]:
    buffer = str(memory_mib - max(24, memory_mib // 16))
    return {"contiguous quarter": [str(memory_mib // 4), "contiguous"],
            "every 4th page": [buffer, "every4"],
            "25% random pages": [buffer, "random25"],
            "fully written": [buffer, "contiguous"]}[layout]


def save_guest(vmstate_cmd: str, program: str, layout: str, memory_mib: int, cwd,
               exit_at_once: bool = False, image: str = "vm_image.sav", env=None):
    """Run fill_memory in the layout until it saves itself; returns the CompletedProcess."""
    return subprocess.run([vmstate_cmd, "run", "--memory", f"{memory_mib}M", "--image", image,
                           program, *fill_arguments(layout, memory_mib),
                           *(["exit"] if exit_at_once else [])],
                          cwd=cwd, env=env, check=True, capture_output=True)


def stored_bytes(path) -> int:
    """Bytes a (sparse) file stores on disk."""
    return path.stat().st_blocks * 512


def timing_marks(stderr: bytes | str) -> dict[str, int]:
    """The CLOCK_MONOTONIC marks the VMM prints with VMSTATE_TIMING=1."""
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return {line.split()[1]: int(line.split()[2]) for line in text.splitlines()
            if line.startswith("vmstate-timing ")}


def cp_seconds(image, cwd, runs: int, sync: bool = False) -> float:
    """`cp --sparse=always` of the image to a new file that then replaces the previous copy
    (as a save or split does), optionally with a sync of the copy."""
    then_sync = " && sync copy.new" if sync else ""
    return median_seconds(["sh", "-c", f"cp --sparse=always {image} copy.new{then_sync} && "
                           "mv copy.new copy.sav"], runs=runs, cwd=cwd)
