"""The start log: which jobs this worker has started, kept on its row so that a rescue can tell.

A claimed job is ``running`` in the database from the claim on, whether it started or waits in the
worker's buffer. If the worker dies, rescue must not charge an attempt to a job that never ran. So the
worker writes the set of jobs it is running to its row
(``workers.running``): batched, every ``interval`` (10 ms) while the set changes, one small update.

The set holds jobs from their start to their outcome, at most the pool's concurrency. A job started
in the last few ms before a crash may be missing from the row: it gets its attempt back and counts a
rescue. A job that was rescued before (``ClaimedJob.suspect``) is written synchronously before it
starts, so a job that kills its worker is charged from its second run on.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .loops import BackgroundLoop

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .job import ClaimedJob
    from .store import Store

logger = logging.getLogger("taskpg.worker")

#: Seconds between two writes of a changing start log.
START_LOG_INTERVAL = 0.01


class StartLog(BackgroundLoop):
    def __init__(
        self,
        store: Store,
        worker_id: str,
        interval: float = START_LOG_INTERVAL,
        stop_event: threading.Event | None = None,
    ) -> None:
        super().__init__("starts", store, stop_event=stop_event)
        self.worker_id = worker_id
        self.interval = interval
        self._running: set[str] = set()
        self._written: frozenset[str] | None = frozenset()  # what the row says (None: unknown, write again)
        self._lock = threading.Lock()  # guards the set: held for no I/O, runners take it at every start
        self._writing = threading.Lock()  # one write at a time

    def job_started(self, job: ClaimedJob) -> None:
        """``job`` starts now; a suspect job is written before this returns."""
        with self._lock:
            self._running.add(job.id)
        if job.suspect:
            try:
                self.write()
            except Exception as exc:  # Postgres is away: its outcome cannot be written either
                logger.warning("job %s: could not record its start (%s); it starts anyway", job.id, exc)

    def jobs_finished(self, job_ids: Iterable[str]) -> None:
        """They have their outcomes: they no longer count as running."""
        with self._lock:
            self._running.difference_update(job_ids)

    def write(self) -> None:
        """Write the set to the worker's row if it changed since the last write."""
        with self._writing:
            with self._lock:
                current = frozenset(self._running)
            if current == self._written:
                return
            self._written = None
            if self.store.record_running(self.worker_id, sorted(current)):
                self._written = current
            # else: the heartbeat has not registered the worker yet; the next round writes again

    def step(self) -> float:
        self.write()
        return self.interval
