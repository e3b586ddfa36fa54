"""Writing new jobs: one INSERT, or COPY for many; on the app's pool or the caller's transaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from . import codec
from .broker import Database, atomic
from .limits import DROPPED, Throttle, active_unique, admit_throttle, take_unique_lock


@dataclass(frozen=True)
class NewJob:
    """A job ready to be written: arguments already encoded as JSON text."""

    id: str
    task: str
    queue: str
    args: str
    kwargs: str
    priority: int
    max_attempts: int
    eta: dt.datetime | None = None
    countdown: float = 0.0
    unique_key: str | None = None  # at most one unfinished job per key
    not_before: dt.datetime | None = None  # a deferred throttled job waits for its window


@dataclass(frozen=True)
class Guard:
    """Checks made in the enqueue's own transaction: a throttle, a time-bound unique key."""

    task: str
    throttle: Throttle | None = None
    unique_for_key: str | None = None
    unique_for: float | None = None


def insert_job(
    db: Database, job: NewJob, conn: psycopg.Connection[Any] | None = None, guard: Guard | None = None
) -> str | None:
    """Insert one job (and NOTIFY its queue if it is due now).

    Returns the id of the job that stands for this call: the new job, or the job already holding
    its unique key; None when a throttle turned the call away.
    """
    if conn is not None:
        db.check_schema()
        return _insert(db, job, conn, guard)
    return db.run(lambda own: _insert(db, job, own, guard))


def insert_jobs(
    db: Database, jobs: Sequence[NewJob], guards: Sequence[Guard | None], conn: psycopg.Connection[Any] | None = None
) -> list[str | None]:
    """Insert jobs one by one (each with its checks) in one transaction; returns what insert_job does."""

    def write(target: psycopg.Connection[Any]) -> list[str | None]:
        with atomic(target):
            return [_insert(db, job, target, guard) for job, guard in zip(jobs, guards, strict=True)]

    if conn is not None:
        db.check_schema()
        return write(conn)
    return db.run(write)


def _params(db: Database, job: NewJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "task": job.task,
        "queue": job.queue,
        "args": job.args,
        "kwargs": job.kwargs,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "eta": job.eta,
        "countdown": job.countdown,
        "unique_key": job.unique_key,
        "not_before": job.not_before,
        "channel": db.queries.jobs_channel,
    }


def _insert(db: Database, job: NewJob, conn: psycopg.Connection[Any], guard: Guard | None) -> str | None:
    if guard is None and job.unique_key is None:  # the common case: one round trip
        conn.execute(db.queries.insert_job, _params(db, job))
        return job.id
    with atomic(conn):
        # Uniqueness first: a call that collides returns the holder and takes no throttle place.
        if job.unique_key is not None:
            existing = active_unique(db, conn, [job.unique_key]).get(job.unique_key)
            if existing is not None:
                return existing
        if guard is not None and guard.unique_for_key is not None and guard.unique_for is not None:
            holder = take_unique_lock(db, conn, guard.unique_for_key, job.id, guard.unique_for)
            if holder != job.id:
                return holder
        if guard is not None and guard.throttle is not None:
            admitted = admit_throttle(db, conn, guard.task, guard.throttle)
            if admitted == DROPPED:
                if guard.unique_for_key is not None:  # no job: do not hold its unique key either
                    conn.execute(db.queries.release_unique_lock, {"key": guard.unique_for_key, "job_id": job.id})
                return None
            if isinstance(admitted, dt.datetime):
                job = dataclasses.replace(job, not_before=admitted)  # its window's start, or later if asked
        for _ in range(3):  # the holder of a unique key may finish between our insert and our look-up
            row = conn.execute(db.queries.insert_job, _params(db, job)).fetchone()
            if (row is not None and row[0] == 1) or job.unique_key is None:
                return job.id
            existing = active_unique(db, conn, [job.unique_key]).get(job.unique_key)
            if existing is not None:
                return existing
    raise RuntimeError(f"could not settle unique key {job.unique_key!r}")  # pragma: no cover - a livelock guard


def copy_jobs(db: Database, jobs: Iterable[NewJob], conn: psycopg.Connection[Any] | None = None) -> int:
    """COPY many jobs in one transaction (the caller's, if given); one NOTIFY per queue. Returns the count."""
    if conn is not None:
        db.check_schema()
        with atomic(conn):  # a savepoint: a failed COPY leaves the caller's transaction usable
            return _copy(db, jobs, conn)
    pending = iter(jobs)
    first = next(pending, None)
    if first is None:
        return 0
    consumed = False

    def stream() -> Iterator[NewJob]:
        nonlocal consumed
        consumed = True
        yield first
        yield from pending

    def copy_batch(own: psycopg.Connection[Any]) -> int:
        with own.transaction():
            return _copy(db, stream(), own)

    # The jobs are streamed, not kept: a lost connection is retried only before the first row left.
    return db.run(copy_batch, can_retry=lambda: not consumed)


def insert_idempotent(
    db: Database,
    jobs: Sequence[NewJob],
    dead_reasons: dict[str, str] | None = None,
    conn: psycopg.Connection[Any] | None = None,
) -> int:
    """Insert jobs that may already be in the table (a re-flushed batch): COPY into a temporary
    staging table, then ``INSERT ... ON CONFLICT (id) DO NOTHING`` in one transaction.

    Jobs named in ``dead_reasons`` are stored dead with that reason as their only error.
    Returns how many were new. ``jobs`` is a sequence, not an iterator: a retry after a lost
    connection must write the same jobs again.
    """

    def write(own: psycopg.Connection[Any]) -> int:
        with atomic(own):
            own.execute(db.queries.create_staging)
            _copy(db, jobs, own, into=db.queries.copy_staging, dead_reasons=dead_reasons or {}, notify=False)
            row = own.execute(db.queries.insert_from_staging, {"channel": db.queries.jobs_channel}).fetchone()
            return int(row[0]) if row else 0

    if conn is not None:
        return write(conn)
    return db.run(write)


def _copy(
    db: Database,
    jobs: Iterable[NewJob],
    conn: psycopg.Connection[Any],
    into: str | None = None,
    dead_reasons: dict[str, str] | None = None,
    notify: bool = True,
) -> int:
    row = conn.execute(db.queries.db_now).fetchone()
    assert row is not None
    now: dt.datetime = row[0]
    queues: set[str] = set()
    count = 0
    with conn.cursor() as cur, cur.copy(into or db.queries.copy_jobs) as copy:
        for job in jobs:
            run_at = job.eta or now + dt.timedelta(seconds=job.countdown)
            state = "scheduled" if run_at > now else "available"
            errors, finished_at = "[]", None
            reason = dead_reasons.get(job.id) if dead_reasons else None
            if reason is not None:
                state, finished_at = "dead", now
                errors = codec.dumps(
                    [
                        {
                            "attempt": 0,
                            "type": "EnvelopeRejected",
                            "module": "taskpg",
                            "message": reason,
                            "traceback": None,
                            "at": now.isoformat(),
                        }
                    ]
                )
            elif state == "available":
                queues.add(job.queue)
            values = (job.id, job.task, job.queue, job.args, job.kwargs, job.priority, job.max_attempts, state, run_at)
            copy.write_row(values if into is None else (*values, job.unique_key, errors, finished_at))
            count += 1
    if queues and notify:
        conn.execute(db.queries.notify_queues, {"channel": db.queries.jobs_channel, "queues": sorted(queues)})
    return count
