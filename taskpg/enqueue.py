"""Writing new jobs: one INSERT, or COPY for many; on the app's pool or the caller's transaction.

Waking workers: an enqueue on the caller's connection NOTIFYs inside the caller's transaction
(delivered only if it commits). On the app's own connections it does the same, unless the app has
an ``announce`` function (``notify_debounce``): then the statement does not notify, and
``announce(queue)`` is called after the commit (see notifier.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
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


#: Tell the workers of a queue that it has new jobs due now, after the enqueue committed.
Announce = Callable[[str], None]

#: One call of a JobBatch: (job id, args JSON, kwargs JSON).
Row = tuple[str, str, str]


@dataclass(frozen=True)
class JobBatch:
    """Calls of one task that share every option (``delay_many``'s COPY path).

    ``rows`` is read once, while the COPY runs; it may raise to abort the batch (nothing is written).
    """

    task: str
    queue: str
    priority: int
    max_attempts: int
    rows: Iterable[Row]
    eta: dt.datetime | None = None
    countdown: float = 0.0


@dataclass(frozen=True)
class Guard:
    """Checks made in the enqueue's own transaction: a throttle, a time-bound unique key."""

    task: str
    throttle: Throttle | None = None
    unique_for_key: str | None = None
    unique_for: float | None = None


def insert_job(
    db: Database,
    job: NewJob,
    conn: psycopg.Connection[Any] | None = None,
    guard: Guard | None = None,
    announce: Announce | None = None,
) -> str | None:
    """Insert one job (and wake its queue if it is due now).

    Returns the id of the job that stands for this call: the new job, or the job already holding
    its unique key; None when a throttle turned the call away.
    """
    if conn is not None:
        db.check_schema()
        return _insert(db, job, conn, guard, notify=True)[0]
    holder, due = db.run(lambda own: _insert(db, job, own, guard, notify=announce is None))
    if due and announce is not None:
        announce(job.queue)
    return holder


def insert_jobs(
    db: Database,
    jobs: Sequence[NewJob],
    guards: Sequence[Guard | None],
    conn: psycopg.Connection[Any] | None = None,
    announce: Announce | None = None,
) -> list[str | None]:
    """Insert jobs one by one (each with its checks) in one transaction; returns what insert_job does."""
    notify = conn is not None or announce is None

    def write(target: psycopg.Connection[Any]) -> tuple[list[str | None], set[str]]:
        holders, due = [], set()
        with atomic(target):
            for job, guard in zip(jobs, guards, strict=True):
                holder, job_due = _insert(db, job, target, guard, notify)
                holders.append(holder)
                if job_due:
                    due.add(job.queue)
        return holders, due

    if conn is not None:
        db.check_schema()
        return write(conn)[0]
    holders, due = db.run(write)
    if announce is not None:
        for queue in sorted(due):
            announce(queue)
    return holders


def _params(db: Database, job: NewJob, notify: bool) -> dict[str, Any]:
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
        "notify": notify,
    }


def _insert(
    db: Database, job: NewJob, conn: psycopg.Connection[Any], guard: Guard | None, notify: bool
) -> tuple[str | None, bool]:
    """Write one job with its checks: (the id standing for the call, whether a new job is due now)."""
    if guard is None and job.unique_key is None:  # the common case: one round trip
        row = conn.execute(db.queries.insert_job, _params(db, job, notify)).fetchone()
        return job.id, row is not None and row[1] > 0
    with atomic(conn):
        # Uniqueness first: a call that collides returns the holder and takes no throttle place.
        if job.unique_key is not None:
            existing = active_unique(db, conn, [job.unique_key]).get(job.unique_key)
            if existing is not None:
                return existing, False
        if guard is not None and guard.unique_for_key is not None and guard.unique_for is not None:
            holder = take_unique_lock(db, conn, guard.unique_for_key, job.id, guard.unique_for)
            if holder != job.id:
                return holder, False
        if guard is not None and guard.throttle is not None:
            admitted = admit_throttle(db, conn, guard.task, guard.throttle)
            if admitted == DROPPED:
                if guard.unique_for_key is not None:  # no job: do not hold its unique key either
                    conn.execute(db.queries.release_unique_lock, {"key": guard.unique_for_key, "job_id": job.id})
                return None, False
            if isinstance(admitted, dt.datetime):
                job = dataclasses.replace(job, not_before=admitted)  # its window's start, or later if asked
        for _ in range(3):  # the holder of a unique key may finish between our insert and our look-up
            row = conn.execute(db.queries.insert_job, _params(db, job, notify)).fetchone()
            if row is not None and row[0] == 1:
                return job.id, row[1] > 0
            if job.unique_key is None:
                return job.id, False
            existing = active_unique(db, conn, [job.unique_key]).get(job.unique_key)
            if existing is not None:
                return existing, False
    raise RuntimeError(f"could not settle unique key {job.unique_key!r}")  # pragma: no cover - a livelock guard


def copy_batch(
    db: Database, batch: JobBatch, conn: psycopg.Connection[Any] | None = None, announce: Announce | None = None
) -> int:
    """COPY a batch in one transaction (the caller's, if given) and wake its queue. Returns the count."""
    if conn is not None:
        db.check_schema()
        with atomic(conn):  # a savepoint: a failed COPY leaves the caller's transaction usable
            count, due = _copy_batch(db, batch, batch.rows, conn, own_transaction=False)
            if due:
                _notify(db, conn, batch.queue)
        return count
    pending = iter(batch.rows)
    first = next(pending, None)
    if first is None:
        return 0
    consumed = False

    def stream() -> Iterator[Row]:
        nonlocal consumed
        consumed = True
        yield first
        yield from pending

    def write(own: psycopg.Connection[Any]) -> tuple[int, bool]:
        with own.transaction():
            count, due = _copy_batch(db, batch, stream(), own, own_transaction=True)
            if due and announce is None:
                _notify(db, own, batch.queue)
        return count, due

    # The rows are streamed, not kept: a lost connection is retried only before the first row left.
    count, due = db.run(write, can_retry=lambda: not consumed)
    if due and announce is not None:
        announce(batch.queue)
    return count


#: Rows per ``Copy.write``: big enough to make the call cheap, small enough to overlap with Postgres.
COPY_CHUNK = 1000


def _copy_batch(
    db: Database, batch: JobBatch, rows: Iterable[Row], conn: psycopg.Connection[Any], own_transaction: bool
) -> tuple[int, bool]:
    """COPY the rows as text lines; returns (count, whether the jobs are due now).

    The lines are built here rather than by ``Copy.write_row``: the columns shared by the batch are
    formatted once, and the only text that needs COPY escaping is the JSON, whose only special
    character is the backslash (JSON encoders escape tabs, newlines and other control characters).
    """
    if own_transaction and batch.eta is None and not batch.countdown:
        statement, due, shared = db.queries.copy_jobs_due_now, True, "available"
    else:  # run_at from the database clock, as for a single enqueue (or the eta as given)
        now = _db_now(db, conn)
        run_at = batch.eta or now + dt.timedelta(seconds=batch.countdown)
        due = run_at <= now
        statement, shared = db.queries.copy_jobs, f"{'available' if due else 'scheduled'}\t{run_at.isoformat()}"
    tail = f"\t{batch.task}\t{batch.queue}\t{batch.priority}\t{batch.max_attempts}\t{shared}\n"
    count = 0
    lines: list[str] = []
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for job_id, args, kwargs in rows:
            lines.append(f"{job_id}\t{_copy_text(args)}\t{_copy_text(kwargs)}{tail}")
            if len(lines) == COPY_CHUNK:
                copy.write("".join(lines))
                count += COPY_CHUNK
                lines.clear()
        copy.write("".join(lines))
    return count + len(lines), due


def _copy_text(json_text: str) -> str:
    """JSON text as a field of COPY's text format (task and queue names never need escaping)."""
    return json_text.replace("\\", "\\\\")


def _db_now(db: Database, conn: psycopg.Connection[Any]) -> dt.datetime:
    """The database clock: run_at of copied jobs comes from it, as for a single enqueue."""
    row = conn.execute(db.queries.db_now).fetchone()
    assert row is not None
    now: dt.datetime = row[0]
    return now


def _notify(db: Database, conn: psycopg.Connection[Any], queue: str) -> None:
    conn.execute(db.queries.notify_queues, {"channel": db.queries.jobs_channel, "queues": [queue]})


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
            _copy_staging(db, jobs, own, dead_reasons or {})
            row = own.execute(db.queries.insert_from_staging, {"channel": db.queries.jobs_channel}).fetchone()
            return int(row[0]) if row else 0

    if conn is not None:
        return write(conn)
    return db.run(write)


def _copy_staging(
    db: Database, jobs: Iterable[NewJob], conn: psycopg.Connection[Any], dead_reasons: dict[str, str]
) -> None:
    now = _db_now(db, conn)
    with conn.cursor() as cur, cur.copy(db.queries.copy_staging) as copy:
        for job in jobs:
            run_at = job.eta or now + dt.timedelta(seconds=job.countdown)
            state = "scheduled" if run_at > now else "available"
            errors, finished_at = "[]", None
            reason = dead_reasons.get(job.id)
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
            values = (job.id, job.task, job.queue, job.args, job.kwargs, job.priority, job.max_attempts, state, run_at)
            copy.write_row((*values, job.unique_key, errors, finished_at))
