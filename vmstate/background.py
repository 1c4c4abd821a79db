"""A function running in a background thread whose result (or exception) is collected later."""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    """Starts `function()` in a daemon thread: a process that fails or is interrupted in the
    meantime exits without waiting for it. result() waits, then returns its value or raises
    its exception in the caller's thread."""

    def __init__(self, function: Callable[[], T], name: str):
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True,
                                        name=name)
        self._thread.start()

    def _run(self, function: Callable[[], T]) -> None:
        try:
            self._value = function()
        except BaseException as e:      # re-raised by result(), in the caller's thread
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
