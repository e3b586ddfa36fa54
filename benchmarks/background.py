"""``with SomeLoop(...):`` a helper loop in a daemon thread for the length of a ``with`` block."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, TypeVar

from .pg import BenchmarkError

if TYPE_CHECKING:
    from types import TracebackType

START_TIMEOUT = 10.0
Loop = TypeVar("Loop", bound="BackgroundLoop")


class BackgroundLoop:
    """Subclasses implement ``run()``: set ``self.ready`` once up, loop until ``self.stop`` is set.

    The ``with`` block starts once the loop is ready; leaving it stops the loop, waits for the thread
    and raises the loop's error, if it had one.
    """

    name = "bench-background"

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self._error = exc
            self.ready.set()

    def __enter__(self: Loop) -> Loop:
        self._thread.start()
        if not self.ready.wait(START_TIMEOUT) or self._error is not None:
            raise BenchmarkError(f"{self.name} did not start: {self._error!r}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        self._thread.join(60)
        if self._error is not None and kind is None:
            raise self._error
