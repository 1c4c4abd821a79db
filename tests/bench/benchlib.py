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
