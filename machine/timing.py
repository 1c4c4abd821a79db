"""CLOCK_MONOTONIC marks on stderr for the benchmarks (VMSTATE_TIMING=1)."""

from __future__ import annotations

import os
import time

TIMING_ENV = "VMSTATE_TIMING"


def timing_mark(label: str) -> None:
    if os.environ.get(TIMING_ENV):
        os.write(2, f"vmstate-timing {label} {time.clock_gettime_ns(time.CLOCK_MONOTONIC)}\n"
                 .encode())
