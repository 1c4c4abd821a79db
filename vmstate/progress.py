"""A progress bar on stderr for long work (saving, splitting, joining, sending memory),
shown only when stderr is a terminal and there is enough to show."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

WORTH_SHOWING = 256 << 20          # bytes


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """Yields `advance(bytes)`, or None when no bar is shown."""
    if total < WORTH_SHOWING or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done: progress.advance(task, done)
