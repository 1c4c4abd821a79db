"""Copying sets of guest pages between guest memory and a frame's contiguous buffer, for live
migration. Memory is a numpy array of pages (page_count x 4096 bytes); a set is a sorted
array of page numbers. Runs of consecutive pages are copied as slices (memcpy speed); a set
scattered into many runs is copied by numpy's fancy indexing, so the Python-level work never
follows the number of pages."""

from __future__ import annotations

import numpy as np

SLICE_RUNS = 256             # up to this many runs, copy run by run


def runs(numbers: np.ndarray) -> list[tuple[int, int, int]]:
    """(position in `numbers`, first page, page count) of each run of consecutive pages."""
    breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [len(numbers)])).tolist()
    return [(start, int(numbers[start]), end - start) for start, end in zip(starts, ends)]


def gather(memory: np.ndarray, numbers: np.ndarray, out: np.ndarray) -> None:
    """out[i] = memory[numbers[i]]."""
    if not len(numbers):
        return
    if few_runs(numbers):
        for at, first, count in runs(numbers):
            out[at:at + count] = memory[first:first + count]
    else:
        out[:] = memory[numbers]


def scatter(memory: np.ndarray, numbers: np.ndarray, data: np.ndarray) -> None:
    """memory[numbers[i]] = data[i]."""
    if not len(numbers):
        return
    if few_runs(numbers):
        for at, first, count in runs(numbers):
            memory[first:first + count] = data[at:at + count]
    else:
        memory[numbers] = data


def few_runs(numbers: np.ndarray) -> bool:
    """The pages lie in at most SLICE_RUNS runs."""
    return np.count_nonzero(np.diff(numbers) != 1) < SLICE_RUNS
