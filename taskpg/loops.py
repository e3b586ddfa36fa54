"""One lifecycle for every background service: a thread, its stop and wake-up, its own connection,
the backoff after a failure, and signals tests can wait on.

A service subclasses ``BackgroundLoop`` and writes ``step()``: one round of its work, returning how
many seconds to wait before the next (``wake()`` cuts the wait short). The loop runs ``step()``
until ``stop()``; an exception in a step is logged and the next step comes after the reconnect
policy's backoff (``connections.backoff``), after a lost connection the loop's own connection is
reset first. ``signals`` records named events ("beat", "rescued", "flushed"...) so that a test waits
for one instead of sleeping (River's test signals).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING

from .connections import backoff, describe_failure, needs_reconnect
from .exceptions import DatabaseUnavailable, SchemaNotReady

if TYPE_CHECKING:
    from collections.abc import Callable

    from .connections import Dedicated
    from .store import Store

logger = logging.getLogger("taskpg")


class Signals:
    """Counts of named events, with a way to wait for one (for tests and monitoring)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._changed = threading.Condition()

    def emit(self, name: str) -> None:
        with self._changed:
            self._counts[name] += 1
            self._changed.notify_all()

    def count(self, name: str) -> int:
        with self._changed:
            return self._counts[name]

    def wait_for(self, name: str, count: int = 1, timeout: float | None = 30.0) -> bool:
        """Block until ``name`` was emitted ``count`` times in all; False when ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts[name] >= count, timeout)


class BackgroundLoop:
    """A background service: a daemon thread that runs ``step()`` until stopped.

    ``store`` is the app's store; with ``connection=`` naming it, the loop owns a dedicated
    connection (``self.own`` is the store bound to it, opened on first use, reopened after a
    connection error). ``stop_event`` lets several loops share one stop (a worker's).
    """

    #: Errors no retry can mend (a schema that is not migrated): they end the loop, kept in ``error``.
    fatal: tuple[type[Exception], ...] = (SchemaNotReady,)

    def __init__(
        self,
        name: str,
        store: Store,
        *,
        connection: str | None = None,
        for_claims: bool = False,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.signals = Signals()
        self.started = threading.Event()
        self._owns_stop = stop_event is None
        self._stop = stop_event or threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.error: BaseException | None = None  # what ended the loop when it ended on its own
        #: Since when steps fail with errors that are not a failed session (None: the last step worked).
        self.failing_since: float | None = None
        #: Told when the loop ended without being asked to (a fatal error, or a crash of the thread).
        self.supervisor: Callable[[BackgroundLoop], None] | None = None
        self._dedicated: Dedicated | None = None
        self._own: Store | None = None
        if connection is not None:
            self._dedicated = store.dedicated(connection, for_claims=for_claims)
        _live.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (again, after it stopped, when the loop owns its stop event)."""
        if self.running:
            return
        if self._owns_stop:
            self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"taskpg-{self.name}", daemon=True)
        self._thread.start()

    def run_here(self) -> None:
        """Run the loop in the calling thread until stopped (``taskpg beat`` runs so); a fatal
        error is raised here."""
        if self._owns_stop:
            self._stop.clear()
        self._thread = threading.current_thread()
        self._run()
        if self.error is not None:
            raise self.error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def died(self) -> bool:
        """The loop's thread ended without being asked to."""
        return self._thread is not None and not self.running and (self.error is not None or not self.stopping)

    def stop(self) -> None:
        """Ask the loop to end after its current step."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wake(self) -> None:
        """End the current wait: the next step runs now."""
        self._wake.set()

    # -- the loop's own connection ---------------------------------------------------------------

    @property
    def own(self) -> Store:
        """The store bound to this loop's dedicated connection (opened now if needed)."""
        assert self._dedicated is not None, f"loop {self.name} has no connection of its own"
        if self._own is None or not self._dedicated.is_open:
            self._own = self.store.on(self._dedicated.conn)
            self.on_connect()
        return self._own

    def reset_connection(self) -> None:
        if self._dedicated is not None:
            self._dedicated.reset()
        self._own = None

    # -- what a service writes -------------------------------------------------------------------

    def step(self) -> float | None:
        """One round of work; returns the seconds to wait before the next (None: until woken)."""
        raise NotImplementedError

    def needs_reconnect(self, exc: Exception) -> bool:
        """Whether a failed step means "the session failed" (reset the connection, back off, and log
        the outage once) rather than an error to log with its traceback. A loop on the app's pool
        gets DatabaseUnavailable: the pool already tried again."""
        return isinstance(exc, DatabaseUnavailable) or needs_reconnect(exc)

    def on_connect(self) -> None:
        """Told when ``own`` opened a new connection (a session of the loop's starts afresh)."""

    def on_failure(self, exc: Exception) -> None:
        """Told about a failed step (after the log line), before the backoff wait."""

    def on_stop(self) -> None:
        """Runs in the thread once the loop ended, before its connection closes."""

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        self.started.set()
        crashed: BaseException | None = None
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before the step: a wake() during the step cuts the next wait
                try:
                    delay = self._step()
                except self.fatal as exc:
                    logger.error("%s stopped: %s", self.name, exc)
                    self.error = exc
                    self.signals.emit("failed")
                    break
                if (delay is None or delay > 0) and not self._stop.is_set():
                    self._wake.wait(delay)
            try:
                self.on_stop()
            except Exception:
                logger.exception("%s: could not finish cleanly", self.name)
        except BaseException as exc:  # not an Exception (those are retried): the thread ends here
            crashed = self.error = exc
            raise
        finally:
            self.reset_connection()
            self.signals.emit("stopped")
            if (crashed is not None or self.error is not None or not self._stop.is_set()) and self.supervisor:
                self.supervisor(self)

    def _step(self) -> float | None:
        try:
            delay = self.step()
        except self.fatal:
            raise
        except Exception as exc:
            self._failures += 1
            delay = backoff(self._failures)
            session = self.needs_reconnect(exc)
            if not session and self.failing_since is None:
                self.failing_since = time.monotonic()
            if session:
                self.reset_connection()
                # One line per outage, with its cause; the retries of the same outage only at debug level.
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                logger.log(level, "%s: %s; trying again with backoff", self.name, describe_failure(exc))
            else:
                logger.exception("%s failed; trying again in %.1f s", self.name, delay)
            self.on_failure(exc)
            return delay
        if self._failures:
            logger.warning("%s works again after %d failed round(s)", self.name, self._failures)
            self._failures = 0
            self.failing_since = None
        return delay

    def _forget_after_fork(self) -> None:
        self._thread = None  # a forked child has the object but not the thread


_live: weakref.WeakSet[BackgroundLoop] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loop in list(_live):
        loop._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
