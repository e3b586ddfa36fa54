"""LISTEN for new work on a dedicated connection and wake the fetch loop.

After a connection loss the loop reconnects with the common backoff, LISTENs again and wakes the
fetch loop once (anything announced while it was away is picked up by that claim). An idle
connection is pinged every few seconds, so a half-open socket is noticed instead of silently
hearing nothing.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .loops import BackgroundLoop

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from .store import Store

PING_EVERY = 5.0
#: How long one step waits for notifications (a stop request is seen this fast).
LISTEN_SLICE = 0.25


class Listener(BackgroundLoop):
    def __init__(
        self,
        store: Store,
        queues: Collection[str],
        on_work: Callable[[], None],
        stop_event: threading.Event | None = None,
    ) -> None:
        super().__init__("listener", store, connection="listener", stop_event=stop_event)
        self.queues = frozenset(queues)
        self.on_work = on_work
        self.connected = threading.Event()  # set while the LISTEN connection is up
        self._last_ping = 0.0

    def step(self) -> float:
        own = self.own  # first: a new connection clears `connected`
        if not self.connected.is_set():
            own.listen_for_jobs()
            self.connected.set()
            self._last_ping = time.monotonic()
            self.signals.emit("listening")
            self.on_work()  # catch up on anything announced while we were not listening
        for queue in own.notifications(LISTEN_SLICE):
            if queue in self.queues:
                self.on_work()
        if time.monotonic() - self._last_ping > PING_EVERY:
            own.ping()
            self._last_ping = time.monotonic()
        return 0.0

    def on_connect(self) -> None:
        self.connected.clear()  # a new session: LISTEN again

    def on_failure(self, exc: Exception) -> None:
        self.reset_connection()
        self.connected.clear()
