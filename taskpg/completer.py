"""Writing outcomes back in batches: one statement per batch, on the completer's own connection.

Outcomes pile up in a queue while a batch is being written; the next batch takes all of them
(up to ``max_batch``). After a lost connection the same batch is written again (the loop's backoff;
nothing is dropped: the batch stays in hand until it is written, and a write repeated after a
partial success changes nothing, because every write is fenced by the attempt's lease). Dead jobs
whose task names a ``dead_letter`` are routed in the same transaction that marks them dead.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from . import failures
from .connections import refuses_value
from .deadletter import route_dead_letter
from .job import JobState, Outcome
from .loops import BackgroundLoop

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from .store import Store
    from .task import Task

logger = logging.getLogger("taskpg.worker")


class Completer(BackgroundLoop):
    """Batches outcomes and writes them with ``Store.finish``; starts at once."""

    def __init__(
        self,
        store: Store,
        tasks: Mapping[str, Task[Any, Any]],
        max_batch: int = 1000,
        on_written: Callable[[list[Outcome]], None] = lambda batch: None,
        on_applied: Callable[[list[Outcome]], None] = lambda applied: None,
    ) -> None:
        super().__init__("completer", store, connection="completer")
        self.tasks = tasks
        self.on_written = on_written  # told once a batch is in the database
        #: Told the outcomes that changed their job (lease still held), as written: a refused outcome's
        #: OutcomeNotStorable replacement instead of it.
        self.on_applied = on_applied
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._batch: list[Outcome] | None = None  # the batch in hand (kept across a failed write)
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self.start()

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put(outcome)

    def pending(self) -> int:
        """Outcomes handed over and not yet written."""
        with self._lock:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every outcome added so far is written."""
        return self._idle.wait(timeout)

    def close(self, timeout: float | None = 30) -> None:
        """Write what is pending (waiting up to ``timeout``), then stop."""
        if self.running:
            self.wait_idle(timeout)
        self._queue.put(None)
        self.join(timeout)

    def take_unwritten(self) -> list[Outcome]:
        """Outcomes handed over and not written (after the loop stopped): the batch in hand, then the queue."""
        taken = list(self._batch or [])
        self._batch = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                taken.append(item)
        with self._lock:
            self._pending = 0
            self._idle.set()
        return taken

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> float:
        batch = self._batch if self._batch is not None else self._take()
        if batch is None:
            self.stop()
            return 0.0
        self._batch = batch
        try:
            changed = set(write_outcomes(self.own, batch, self.tasks))
            applied = [outcome for outcome in batch if outcome.job.id in changed]
        except Exception as exc:
            if not refuses_value(exc):
                # A failed session (lost connection, read-only server...) or anything unknown: never "this
                # value is bad". The loop backs off (and reconnects) and this batch is written again;
                # outcomes already written are fenced by their lease, so writing them again changes nothing.
                raise
            logger.error("a batch of outcomes was refused (%s); writing them one by one", exc)
            applied = [written for outcome in batch if (written := self._write_alone(outcome)) is not None]
        self._batch = None
        with self._lock:
            self._pending -= len(batch)
            if self._pending == 0:
                self._idle.set()
        self.signals.emit("written")
        self.on_written(batch)
        self.on_applied(applied)
        return 0.0

    def _take(self) -> list[Outcome] | None:
        """The next batch: everything queued, up to ``max_batch`` (blocks for the first); None to stop."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            batch.append(item)
        return batch

    def _write_alone(self, outcome: Outcome) -> Outcome | None:
        """Write one outcome (or, if Postgres refuses it, its OutcomeNotStorable replacement); returns
        what changed the job, None when its lease was lost."""
        try:
            written = outcome if write_outcomes(self.own, [outcome], self.tasks) else None
        except Exception as exc:
            if not refuses_value(exc):
                raise  # the whole batch is tried again after the backoff
            logger.error("job %s: outcome refused by Postgres (%s); recording it as dead", outcome.job.id, exc)
            replacement = self._refused(outcome, exc)
            written = replacement if write_outcomes(self.own, [replacement], self.tasks) else None
        return written

    @staticmethod
    def _refused(outcome: Outcome, exc: Exception) -> Outcome:
        message = f"Postgres refused this job's outcome: {exc}"
        error = failures.record("OutcomeNotStorable", message, outcome.job.attempt)
        return Outcome(outcome.job, JobState.DEAD, error=error)


def write_outcomes(store: Store, batch: Sequence[Outcome], tasks: Mapping[str, Task[Any, Any]]) -> list[str]:
    """Write a batch of outcomes in one transaction, then announce it; returns the ids that changed
    (lease still held)."""
    with store.transaction() as tx:
        finished = tx.finish(batch)
        if len(finished.changed) < len(batch):
            logger.warning(
                "%d outcome(s) dropped: their lease was lost (job rescued or finished elsewhere)",
                len(batch) - len(finished.changed),
            )
        changed = set(finished.changed)
        for outcome in batch:
            if outcome.state is JobState.DEAD and outcome.job.id in changed:
                route_dead_letter(tx, outcome.job.id, tasks)
    if finished.finished or finished.woken:
        # A lost notification costs a get() waiter at most its safety re-check; it never loses a job.
        try:
            store.announce(finished.finished, finished.woken)
        except Exception as exc:
            logger.warning("could not announce %d finished job(s): %s", len(finished.finished), exc)
    return finished.changed
