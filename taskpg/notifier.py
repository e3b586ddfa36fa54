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
import os
import threading
import time
import weakref
from typing import Any

import psycopg

from .broker import connect
from .reconnect import reconnecting
from .sql import Queries

logger = logging.getLogger("taskpg")

#: How long ``close()`` waits for the last NOTIFYs to go out.
CLOSE_TIMEOUT = 5.0
NEVER = float("-inf")
#: How the notifier's connection shows in pg_stat_activity.
APPLICATION_NAME = "taskpg-notifier"


class Notifier:
    """Sends ``pg_notify(channel, queue)`` for announced queues, at most once per queue per window.

    The thread and its connection start with the first announcement; ``close()`` sends what is
    pending and stops them (the app's ``close()`` calls it; so does interpreter exit). An
    announcement after ``close()`` starts them again.
    """

    def __init__(self, dsn: str, queries: Queries, window: float) -> None:
        self.dsn = dsn
        self.queries = queries
        self.window = window
        self.sent = 0  # NOTIFY statements sent, for tests and monitoring
        self._init_state()
        _live.add(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: set[str] = set()  # queues announced and not yet notified
        self._last_sent: dict[str, float] = {}  # queue -> monotonic time of its last NOTIFY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def announce(self, queue: str) -> None:
        """Ask for a NOTIFY of ``queue`` (call it after the enqueue committed)."""
        with self._cond:
            if queue in self._pending:
                return  # a NOTIFY of this queue is already due: it will cover this job too
            self._pending.add(queue)
            if self._thread is None:
                self._start()
            self._cond.notify()

    def _start(self) -> None:
        """Start the thread (called holding the lock, which the thread takes first)."""
        self._stop.clear()
        thread = threading.Thread(target=self._run, name="taskpg-notifier", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # interpreter shutdown: the job is committed, so do not fail the call
            logger.warning("cannot start the notifier (%s); workers will find the jobs when they poll", exc)
            return
        self._thread = thread

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send the pending NOTIFYs now, then stop the thread and close its connection."""
        with self._cond:
            self._stop.set()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while due := self._next_due():
                self._send(due)
        finally:
            self._reset()

    def _next_due(self) -> list[str]:
        """Wait until some pending queue may be notified and return those queues; after ``close()``
        return every pending queue at once, and none (ending the thread) when nothing is left."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stop.is_set():
                    due = sorted(self._pending)  # closing: no more waiting for windows
                    if not due:
                        self._thread = None  # under the lock: the next announcement starts a new one
                        return due
                else:
                    due = sorted(q for q in self._pending if now - self._last_sent.get(q, NEVER) >= self.window)
                if due:
                    self._pending.difference_update(due)
                    for queue in due:
                        self._last_sent[queue] = now
                    return due
                self._cond.wait(self._wait_time(now))

    def _wait_time(self, now: float) -> float | None:
        """Until the soonest pending queue's window ends; None (until announced) with none pending."""
        if not self._pending:
            return None
        return max(0.0, min(self._last_sent[q] + self.window for q in self._pending) - now)

    def _send(self, queues: list[str]) -> None:
        try:
            reconnecting(lambda: self._notify(queues), "announcing new jobs", self._reset, self._stop)
        except Exception as exc:
            # Closing during an outage, or something unexpected: workers' polling picks the jobs up.
            logger.warning("could not NOTIFY queues %s (%s); workers will find the jobs when they poll", queues, exc)
            if not self._stop.is_set():
                time.sleep(min(1.0, max(self.window, 0.05)))
                with self._cond:
                    self._pending.update(queues)  # try again

    def _notify(self, queues: list[str]) -> None:
        if self._conn is None:
            self._conn = connect(self.dsn, application_name=APPLICATION_NAME)
        # The statement the worker announces finished jobs with: its commit does not wait for the WAL
        # flush while it holds the notify lock (the jobs were committed durably by their enqueuers).
        q = self.queries
        params = {"payloads": [], "queues": queues, "done_channel": q.done_channel, "jobs_channel": q.jobs_channel}
        self._conn.execute(q.announce, params)
        self.sent += 1

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


_live: weakref.WeakSet[Notifier] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, send what is pending (the thread is a daemon and would just vanish)."""
    for notifier in list(_live):
        notifier.close(timeout=1.0)


def _after_fork_in_child() -> None:
    """A forked child has the parent's notifiers but not their thread: start afresh, and leave the
    parent's connection (a socket the child shares) alone."""
    for notifier in list(_live):
        notifier._init_state()


os.register_at_fork(after_in_child=_after_fork_in_child)
