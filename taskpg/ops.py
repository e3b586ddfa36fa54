"""Read-only views for operators: job counts, workers, one job's full record."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import psycopg

from .broker import Database
from .exceptions import ConfigurationError


def validate_job_id(job_id: str) -> str:
    """Job ids are UUIDs; anything else is refused before it reaches SQL."""
    try:
        return str(uuid.UUID(str(job_id)))
    except ValueError:
        raise ConfigurationError(f"{job_id!r} is not a taskpg job id (a UUID)") from None


def job_counts(db: Database) -> dict[str, dict[str, int]]:
    """queue -> state -> number of jobs."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    with db.connection() as conn:
        for queue, state, count in conn.execute(db.queries.job_counts).fetchall():
            counts[queue][state] = int(count)
    return dict(counts)


def limit_stats(db: Database) -> dict[str, dict[str, int]]:
    """task -> {"throttled": calls turned away by throttles, "snoozed": snoozes of kept jobs}."""
    with db.connection() as conn:
        rows = conn.execute(db.queries.task_limit_stats).fetchall()
    return {task: {"throttled": int(throttled), "snoozed": int(snoozed)} for task, throttled, snoozed in rows}


def workers(db: Database, alive_within: float = 30.0) -> list[dict[str, Any]]:
    """Registered workers with their last heartbeat; ``alive`` when it is within ``alive_within`` s."""
    with db.connection() as conn:
        cur = conn.execute(db.queries.list_workers, {"alive_within": alive_within})
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def inspect_job(db: Database, job_id: str, conn: psycopg.Connection[Any] | None = None) -> dict[str, Any] | None:
    """Every column of one job, error history included (None when there is no such job)."""
    job_id = validate_job_id(job_id)
    if conn is None:
        return db.run(lambda own: inspect_job(db, job_id, own))
    cur = conn.execute(db.queries.get_job, {"id": job_id})
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description or ()], row, strict=True))
