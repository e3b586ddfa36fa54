"""Read-only views for operators: job counts, the status API's queue counts, job listings, workers,
limit counts, one job's full record."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .job import JobRecord, JobState, validate_job_id
from .store import RECENT

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from .store import JobSummary, LimitCounts, Store, WorkerRow

#: A worker whose last heartbeat is older than this is shown as silent.
ALIVE_WITHIN = 30.0
#: The window of the status API's throughput: jobs finished in the last minute.
THROUGHPUT_WINDOW = 60.0
#: The status API's names (BullMQ's getJobCounts) for taskpg's states.
STATUS_NAMES = {
    JobState.AVAILABLE.value: "waiting",
    JobState.RUNNING.value: "active",
    JobState.SUCCEEDED.value: "completed",
    JobState.DEAD.value: "failed",
    JobState.SCHEDULED.value: "delayed",
    JobState.CANCELLED.value: "cancelled",
}


def job_counts(store: Store) -> dict[str, dict[str, int]]:
    """queue -> state -> number of jobs."""
    return store.job_counts()


def limit_stats(store: Store) -> dict[str, LimitCounts]:
    """task -> calls turned away by throttles and snoozes of kept jobs."""
    return store.limit_counts()


def workers(store: Store, alive_within: float = ALIVE_WITHIN) -> list[WorkerRow]:
    """Registered workers with their last heartbeat; ``alive`` when it is within ``alive_within`` s."""
    return store.list_workers(alive_within)


def queue_status(
    store: Store,
    limits: Mapping[str, tuple[str | None, int | None]] | None = None,
    known: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """Per queue, BullMQ's ``getJobCounts`` names (waiting, active, completed, failed, delayed) plus
    cancelled, paused, the oldest waiting job's age (s), jobs finished in the last minute, the
    queue's rate limit and concurrency cap from ``limits``, and which counts are ``estimated``
    (finished states holding over 50,000 jobs are sampled, not counted). Queues with no job yet that are ``known``
    (the app's) or paused are listed with zeros."""
    limits = limits or {}
    paused = store.paused_queues()
    status: dict[str, dict[str, Any]] = {}

    def entry(queue: str) -> dict[str, Any]:
        if queue not in status:
            rate, cap = limits.get(queue, (None, None))
            status[queue] = {name: 0 for name in STATUS_NAMES.values()} | {
                "paused": queue in paused,
                "oldest_waiting_seconds": None,
                "finished_last_minute": 0,
                "rate_limit": rate,
                "concurrency": cap,
                "estimated": [],
            }
        return status[queue]

    for row in store.queue_counts(THROUGHPUT_WINDOW):
        counts = entry(row.queue)
        if row.state == RECENT:
            counts["finished_last_minute"] = row.count
        else:
            counts[STATUS_NAMES[row.state]] = row.count
            if row.estimated:
                counts["estimated"].append(STATUS_NAMES[row.state])
            if row.oldest_seconds is not None:
                counts["oldest_waiting_seconds"] = round(max(row.oldest_seconds, 0.0), 3)
    for queue in [*known, *paused, *limits]:
        entry(queue)
    return dict(sorted(status.items()))


def list_jobs(
    store: Store,
    state: JobState | str,
    queues: Sequence[str] | None = None,
    task: str | None = None,
    id_prefix: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[JobSummary]:
    """Jobs in one state (Celery's ``inspect active/scheduled/reserved``, and more): finished ones newest
    first, the others in the order they run."""
    id_prefix = (id_prefix or "").strip().lower() or None
    if id_prefix is not None and not set(id_prefix) <= set("0123456789abcdef-"):
        return []  # no job id holds other characters
    return store.list_jobs(JobState(state), queues, task, id_prefix, max(1, min(limit, 1000)), max(0, offset))


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
