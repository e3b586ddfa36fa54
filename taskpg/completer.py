"""Writing outcomes back in batches: one statement per batch, on its own connection.

Outcomes pile up in a queue while a batch is being written; the next batch takes all of them
(up to ``max_batch``). A lost connection is retried with backoff (nothing is dropped: the
batch stays in hand until it is written). Dead jobs whose task names a ``dead_letter`` are
routed in the same transaction that marks them dead.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from .broker import Database, connect
from .deadletter import route_dead_letter
from .executor import Outcome, error_record
from .reconnect import reconnecting
from .task import Task

logger = logging.getLogger("taskpg.worker")

#: Finished ids per done-channel notification: 200 UUIDs stay under NOTIFY's 8000-byte payload limit.
ANNOUNCE_CHUNK = 200


class Completer:
    """Batches outcomes and writes them with ``FINISH_JOBS``."""

    def __init__(
        self,
        db: Database,
        tasks: Mapping[str, Task[Any, Any]],
        max_batch: int = 1000,
        on_written: Callable[[list[Outcome]], None] = lambda batch: None,
    ) -> None:
        self.db = db
        self.tasks = tasks
        self.on_written = on_written  # told once a batch is in the database
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._conn: psycopg.Connection[Any] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="taskpg-completer", daemon=True)
        self._thread.start()

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
        self.wait_idle(timeout)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
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
            try:
                reconnecting(functools.partial(self._write, batch), "writing job outcomes", self._reset)
            except Exception:  # not a lost connection: a value Postgres refuses. Write what can be written
                logger.exception("a batch of outcomes was refused; writing them one by one")
                self._write_one_by_one(batch)
            with self._lock:
                self._pending -= len(batch)
                if self._pending == 0:
                    self._idle.set()
            self.on_written(batch)

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _write_one_by_one(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            try:
                reconnecting(functools.partial(self._write, [outcome]), "writing a job outcome", self._reset)
            except Exception as exc:
                replacement = Outcome(
                    outcome.job,
                    "dead",
                    error=error_record(
                        outcome.job, "OutcomeNotStorable", f"Postgres refused this job's outcome: {exc}", None
                    ),
                )
                logger.error("job %s: outcome refused by Postgres (%s); recording it as dead", outcome.job.id, exc)
                reconnecting(functools.partial(self._write, [replacement]), "writing a job outcome", self._reset)

    def _write(self, batch: list[Outcome]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.db.dsn)
        write(self.db, self._conn, batch, self.tasks)


def write(
    db: Database, conn: psycopg.Connection[Any], batch: list[Outcome], tasks: Mapping[str, Task[Any, Any]]
) -> list[str]:
    """Write a batch of outcomes in one transaction, then announce it; returns the ids that changed
    (lease still held)."""
    q = db.queries
    with conn.transaction():
        row = conn.execute(q.finish_jobs, {"outcomes": outcomes_json(batch)}).fetchone()
        changed, finished, woken = row if row else ([], [], [])
        if len(changed) < len(batch):
            logger.warning(
                "%d outcome(s) dropped: their lease was lost (job rescued or finished elsewhere)",
                len(batch) - len(changed),
            )
        changed_ids = set(changed)
        for outcome in batch:
            if outcome.state == "dead" and outcome.job.id in changed_ids:
                route_dead_letter(db, conn, outcome.job.id, tasks)
    if finished or woken:
        announce(db, conn, finished, woken)
    return list(changed)


def announce(db: Database, conn: psycopg.Connection[Any], finished: list[str], queues: list[str]) -> None:
    """Tell ``get()`` waiters about finished jobs and wake the workers of ``queues``, after the commit.

    A lost notification costs a waiter at most its safety re-check; it never loses a job.
    """
    q = db.queries
    payloads = [",".join(finished[start : start + ANNOUNCE_CHUNK]) for start in range(0, len(finished), ANNOUNCE_CHUNK)]
    params = {"payloads": payloads, "queues": queues, "done_channel": q.done_channel, "jobs_channel": q.jobs_channel}
    try:
        conn.execute(q.announce, params)
    except psycopg.Error as exc:
        logger.warning("could not announce %d finished job(s): %s", len(finished), exc)


def outcomes_json(batch: list[Outcome]) -> str:
    """The batch as the JSON array ``FINISH_JOBS`` reads: keys with default values are left out.

    Built as text: ids, leases and states are plain ASCII, results and errors are JSON already.
    """
    items = []
    for outcome in batch:
        job = outcome.job
        item = f'{{"id":"{job.id}","lease":"{job.lease}","state":"{outcome.state}"'
        if outcome.result is not None:
            item += f',"result":{outcome.result}'
        if outcome.error is not None:
            item += f',"error":{outcome.error_json}'
        if outcome.delay:
            item += f',"delay":{float(outcome.delay)!r}'
        if outcome.refund:
            item += f',"refund":{int(outcome.refund)}'
        if outcome.snoozed:
            item += f',"snoozed":{int(outcome.snoozed)}'
        items.append(item + "}")
    return "[" + ",".join(items) + "]"
