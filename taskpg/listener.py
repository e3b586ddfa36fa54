"""LISTEN for new work on a dedicated connection and wake the fetch loop.

After a connection loss the loop reconnects with the common backoff, LISTENs again and wakes the
fetch loop once (anything announced while it was away is picked up by that claim).

A LISTEN connection can also go quiet without failing: its backend frozen, or the network between
black-holing packets (TCP would take many minutes to give up). So the listener checks that it still
hears: every PROBE_EVERY seconds it sends a notification to itself through the app's pool, and if
that probe has not come back within PROBE_TIMEOUT seconds it logs a warning, drops the connection
and listens again on a new one. The check never waits on the suspect connection.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from .loops import BackgroundLoop

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from .store import Store

logger = logging.getLogger("taskpg.worker")

#: Seconds between two probes of a connection that heard its last one.
PROBE_EVERY = 5.0
#: Seconds a probe may take to come back before the connection counts as deaf.
PROBE_TIMEOUT = 5.0
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
        # Queue names never hold "!" or a space, so no worker takes a probe for a queue's news.
        self.probe_payload = f"!probe {uuid.uuid4()}"
        self._probe_sent: float | None = None  # when the unanswered probe went out
        self._last_heard = 0.0

    def step(self) -> float:
        own = self.own  # first: a new connection clears `connected`
        if not self.connected.is_set():
            own.listen_for_jobs()
            self.connected.set()
            self._probe_sent, self._last_heard = None, time.monotonic()
            self.signals.emit("listening")
            self.on_work()  # catch up on anything announced while we were not listening
        for payload in own.notifications(LISTEN_SLICE):
            self._probe_sent, self._last_heard = None, time.monotonic()  # anything heard: it hears
            if payload in self.queues:
                self.on_work()
        self._check_hearing()
        return 0.0

    def _check_hearing(self) -> None:
        now = time.monotonic()
        if self._probe_sent is not None and now - self._probe_sent > PROBE_TIMEOUT:
            logger.warning(
                "the LISTEN connection heard nothing for %.0f s (not even its own probe): listening on a new one",
                now - self._last_heard,
            )
            self.signals.emit("deaf")
            self.on_failure(TimeoutError("the LISTEN connection went deaf"))
        elif self._probe_sent is None and now - self._last_heard > PROBE_EVERY:
            self._probe_sent = now
            self.store.probe(self.probe_payload)  # through the pool: never waits on the suspect connection

    def on_connect(self) -> None:
        self.connected.clear()  # a new session: LISTEN again

    def on_failure(self, exc: Exception) -> None:
        self.reset_connection()
        self.connected.clear()
