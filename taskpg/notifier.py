"""Debounced NOTIFY for enqueues (``TaskPG(notify_debounce=...)``).

Postgres serialises the commits of transactions that NOTIFY: each takes a database-wide lock
at commit and holds it until its commit record is flushed, so concurrent enqueuers that each
notify commit one at a time and lose group commit. With a debounce window, enqueues on the app's
own connections commit without notifying and then ``announce`` their queue here. A background
thread sends the NOTIFYs on its own autocommit connection:

- a queue that has been quiet for a window is notified at once (leading edge), so an isolated
  enqueue is announced within about a millisecond;
- announcements that arrive within the window after a NOTIFY are folded into one more NOTIFY at
  its end (trailing edge), so the last enqueue of a burst is always announced.

A NOTIFY is only ever sent after the enqueue that asked for it committed, so a woken worker finds
the job. If the connection fails, the queues are kept and sent after a reconnect; workers also
poll, so even a NOTIFY lost for good (the process dies) costs latency, not jobs.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .loops import BackgroundLoop

if TYPE_CHECKING:
    from .store import Store

logger = logging.getLogger("taskpg")

#: How long ``close()`` waits for the last NOTIFYs to go out.
CLOSE_TIMEOUT = 5.0
NEVER = float("-inf")
#: How the notifier's connection shows in pg_stat_activity.
APPLICATION_NAME = "taskpg-notifier"


class Notifier(BackgroundLoop):
    """Sends ``pg_notify(channel, queue)`` for announced queues, at most once per queue per window.

    The loop and its connection start with the first announcement; ``close()`` sends what is
    pending and stops them (the app's ``close()`` calls it; so does interpreter exit). An
    announcement after ``close()`` starts them again.
    """

    def __init__(self, store: Store, window: float) -> None:
        super().__init__("notifier", store, connection="notifier")
        self.window = window
        self.sent = 0  # NOTIFY statements sent, for tests and monitoring
        self._init_state()
        _live.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # queues announced and not yet notified
        self._sending: list[str] = []  # queues of the NOTIFY being sent
        self._last_sent: dict[str, float] = {}  # queue -> monotonic time of its last NOTIFY

    def announce(self, queue: str) -> None:
        """Ask for a NOTIFY of ``queue`` (call it after the enqueue committed)."""
        with self._lock:
            if queue in self._pending:
                return  # a NOTIFY of this queue is already due: it will cover this job too
            self._pending.add(queue)
            if not self.running:
                try:
                    self.start()
                except RuntimeError as exc:  # interpreter shutdown: the job is committed, do not fail the call
                    logger.warning("cannot start the notifier (%s); workers will find the jobs when they poll", exc)
                    return
        self.wake()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send the pending NOTIFYs now, then stop the loop and close its connection."""
        self.stop()
        self.join(timeout)

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> float | None:
        due, wait = self._take_due()
        if due:
            self._send(due)
            return 0.0
        return wait

    def _take_due(self) -> tuple[list[str], float | None]:
        """The pending queues whose window has passed (marked as sent), else how long until one has
        (None: nothing is pending)."""
        with self._lock:
            now = time.monotonic()
            due = sorted(q for q in self._pending if now - self._last_sent.get(q, NEVER) >= self.window)
            if due:
                self._pending.difference_update(due)
                self._last_sent.update((queue, now) for queue in due)
                self._sending = due
                return due, 0.0
            if not self._pending:
                return [], None
            return [], max(0.0, min(self._last_sent[q] + self.window for q in self._pending) - now)

    def _send(self, queues: list[str]) -> None:
        # The statement the worker announces finished jobs with: its commit does not wait for the WAL
        # flush while it holds the notify lock (the jobs were committed durably by their enqueuers).
        self.own.announce([], queues)
        self._sending = []
        self.sent += 1
        self.signals.emit("notified")

    def on_failure(self, exc: Exception) -> None:
        with self._lock:
            self._pending.update(self._sending)  # try again after the backoff
            self._sending = []

    def on_stop(self) -> None:
        """Closing: no more waiting for windows; one try for everything still pending."""
        with self._lock:
            queues, self._pending = sorted(self._pending), set()
        if not queues:
            return
        try:
            self._send(queues)
        except Exception as exc:  # workers' polling picks the jobs up
            logger.warning("could not NOTIFY queues %s (%s); workers will find the jobs when they poll", queues, exc)

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._init_state()  # the parent's lock may have been held by one of its threads


_live: weakref.WeakSet[Notifier] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, send what is pending (the thread is a daemon and would just vanish)."""
    for notifier in list(_live):
        notifier.close(timeout=1.0)
