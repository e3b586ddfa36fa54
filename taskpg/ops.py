"""Read-only views for operators: job counts, workers, limit counts, one job's full record."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .job import JobRecord, validate_job_id

if TYPE_CHECKING:
    from .store import LimitCounts, Store, WorkerRow

#: A worker whose last heartbeat is older than this is shown as silent.
ALIVE_WITHIN = 30.0


def job_counts(store: Store) -> dict[str, dict[str, int]]:
    """queue -> state -> number of jobs."""
    return store.job_counts()


def limit_stats(store: Store) -> dict[str, LimitCounts]:
    """task -> calls turned away by throttles and snoozes of kept jobs."""
    return store.limit_counts()


def workers(store: Store, alive_within: float = ALIVE_WITHIN) -> list[WorkerRow]:
    """Registered workers with their last heartbeat; ``alive`` when it is within ``alive_within`` s."""
    return store.list_workers(alive_within)


def inspect_job(store: Store, job_id: str) -> JobRecord | None:
    """Every column of one job, error history included (None when there is no such job)."""
    return store.get_job(validate_job_id(job_id))


def status_report(store: Store) -> dict[str, Any]:
    """Jobs per queue and state, workers and limit counts, as JSON-ready data (``taskpg status --json``)."""
    return {
        "jobs": job_counts(store),
        "workers": [dataclasses.asdict(w) for w in workers(store)],
        "tasks": {task: dataclasses.asdict(c) for task, c in limit_stats(store).items()},
    }
