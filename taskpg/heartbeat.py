"""The worker's heartbeat and the rescue of jobs held by workers that stopped heartbeating."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from .broker import Database, connect
from .deadletter import route_dead_letter
from .reconnect import CONNECTION_ERRORS
from .task import Task

logger = logging.getLogger("taskpg.worker")


class Heartbeat:
    """Every ``interval`` seconds: record that this worker is alive, rescue other workers' stale
    jobs (``rescue_after`` seconds without a heartbeat), and release jobs this worker holds in the
    database but not in memory."""

    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]],
        db: Database,
        worker_id: str,
        queues: list[str],
        concurrency: int,
        interval: float,
        rescue_after: float,
        held_ids: Callable[[], list[str]],
        stop: threading.Event,
    ) -> None:
        self.tasks = tasks
        self.db = db
        self.worker_id = worker_id
        self.queues = queues
        self.concurrency = concurrency
        self.interval = interval
        self.rescue_after = rescue_after
        self.held_ids = held_ids
        self.stop = stop
        self._conn: psycopg.Connection[Any] | None = None
        # Rescue only after this worker has been in touch with Postgres for a whole rescue period:
        # after an outage every worker's heartbeat is stale, and the first one back must give the
        # others time to heartbeat before it calls them dead.
        self._in_touch_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="taskpg-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()  # registered before the first claim
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.db.dsn)
        return self._conn

    def beat(self) -> None:
        self._connection().execute(
            self.db.queries.heartbeat,
            {
                "id": self.worker_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues,
                "concurrency": self.concurrency,
            },
        )
        if self._in_touch_since == float("inf"):
            self._in_touch_since = time.monotonic()  # back in touch: the rescue period starts again

    def rescue(self) -> int:
        """Put back jobs of dead workers; returns how many were rescued (or sent dead)."""
        q = self.db.queries
        conn = self._connection()
        if time.monotonic() - self._in_touch_since < self.rescue_after:
            return 0
        with conn.transaction():
            row = conn.execute(q.rescue_jobs, {"after": self.rescue_after, "channel": q.jobs_channel}).fetchone()
            rescued = int(row[0]) if row else 0
            for job_id in (row[2] if row else None) or []:  # out of attempts: dead, and maybe routed
                route_dead_letter(self.db, conn, str(job_id), self.tasks)
        if rescued:
            logger.warning("rescued %d job(s) from workers silent for over %s s", rescued, self.rescue_after)
        released = conn.execute(q.release_unknown, {"worker_id": self.worker_id, "held": self.held_ids()}).rowcount
        if released:
            logger.warning("released %d job(s) this worker held in the database but not in memory", released)
        conn.execute(q.delete_stale_workers, {"after": max(self.rescue_after * 10, 300)})
        return rescued

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.beat()
                self.rescue()
            except CONNECTION_ERRORS as exc:
                logger.warning("heartbeat failed (%s); retrying in %s s", exc, self.interval)
                self._in_touch_since = float("inf")  # reset by the next heartbeat that gets through
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
            except Exception:
                logger.exception("heartbeat failed")
        if self._conn is not None:
            self._conn.close()

    def unregister(self) -> None:
        try:
            self._connection().execute(self.db.queries.delete_worker, {"id": self.worker_id})
        except CONNECTION_ERRORS as exc:
            logger.warning("could not unregister worker %s: %s", self.worker_id, exc)
        finally:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
