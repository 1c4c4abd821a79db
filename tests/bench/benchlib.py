"""Helpers for the benchmarks: wall-clock medians of whole commands, and a report printer.
Benchmarks print figures against a baseline measured in the same run; they assert nothing
about time."""

from __future__ import annotations

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


def report(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n== {title}")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")


def warm_up_memory(gib: int = 14) -> None:
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
