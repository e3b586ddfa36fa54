"""The worker's heartbeat and the rescue of jobs held by workers that stopped heartbeating."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .connections import needs_reconnect
from .deadletter import route_dead_letter
from .loops import BackgroundLoop

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Mapping

    from .store import Store, WorkerInfo
    from .task import Task

logger = logging.getLogger("taskpg.worker")

#: A worker row silent this many times ``rescue_after`` (and at least STALE_WORKER_MIN s) is deleted.
STALE_WORKER_FACTOR = 10
STALE_WORKER_MIN = 300.0


class Heartbeat(BackgroundLoop):
    """Every ``interval`` seconds: record that this worker is alive, rescue other workers' stale
    jobs (``rescue_after`` seconds without a heartbeat), and release jobs this worker holds in the
    database but not in memory."""

    def __init__(
        self,
        store: Store,
        tasks: Mapping[str, Task[Any, Any]],
        worker: WorkerInfo,
        interval: float,
        rescue_after: float,
        held_ids: Callable[[], list[str]],
        stop_event: threading.Event | None = None,
    ) -> None:
        super().__init__("heartbeat", store, connection="heartbeat", stop_event=stop_event)
        self.tasks = tasks
        self.worker = worker
        self.interval = interval
        self.rescue_after = rescue_after
        self.held_ids = held_ids
        # Rescue only after this worker has been in touch with Postgres for a whole rescue period:
        # after an outage every worker's heartbeat is stale, and the first one back must give the
        # others time to heartbeat before it calls them dead.
        self._in_touch_since = time.monotonic()

    def start(self) -> None:
        self.beat()  # registered before the first claim
        super().start()

    def step(self) -> float:
        self._stop.wait(self.interval)  # the first beat came from start()
        if self.stopping:
            return 0.0
        self.beat()
        self.rescue()
        return 0.0

    def on_failure(self, exc: Exception) -> None:
        if self.needs_reconnect(exc):
            self._in_touch_since = float("inf")  # reset by the next heartbeat that gets through

    def beat(self) -> None:
        self.own.heartbeat(self.worker)
        if self._in_touch_since == float("inf"):
            self._in_touch_since = time.monotonic()  # back in touch: the rescue period starts again
        self.signals.emit("beat")

    def rescue(self) -> int:
        """Put back jobs of dead workers; returns how many were rescued (or sent dead)."""
        if time.monotonic() - self._in_touch_since < self.rescue_after:
            return 0
        with self.own.transaction() as tx:
            rescued = tx.rescue(self.rescue_after)
            for job_id in rescued.dead:  # out of attempts: dead, and maybe routed
                route_dead_letter(tx, job_id, self.tasks)
        if rescued.count:
            logger.warning("rescued %d job(s) from workers silent for over %s s", rescued.count, self.rescue_after)
            self.signals.emit("rescued")
        released = self.own.release_unknown(self.worker.id, self.held_ids())
        if released:
            logger.warning("released %d job(s) this worker held in the database but not in memory", released)
        self.own.delete_stale_workers(max(self.rescue_after * STALE_WORKER_FACTOR, STALE_WORKER_MIN))
        return rescued.count

    def unregister(self) -> None:
        """Remove this worker's row (after the loop stopped)."""
        try:
            self.own.delete_worker(self.worker.id)
        except Exception as exc:
            if not needs_reconnect(exc):
                raise
            logger.warning("could not unregister worker %s: %s", self.worker.id, exc)
        finally:
            self.reset_connection()
