"""The store: the one place where taskpg runs statements.

Every statement of ``sql.py`` has a method here (or shares one with the statements it always runs
with), taking and returning the records of ``job.py`` or the small dataclasses below; no caller
binds a parameter dict or unpacks a row. The rest of taskpg never sees SQL: it decides *what* to
do, the store says it to Postgres (procrastinate's ``manager.py``, River's driver interface).

A ``Store`` runs its statements either on the app's pool (each call takes a pooled connection and is
tried once more after a lost connection: ``Connections.run``) or on one connection it is bound to
with ``store.on(conn)``: a caller's transaction, or a loop's dedicated connection, whose owner
handles reconnects. ``store.run(work)`` and ``store.transaction()`` give ``work`` one connection
for several statements.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg import errors as pg_errors
from psycopg import sql as pg_sql

from . import codec, failures
from .connections import Conn, Connections, Dedicated, atomic
from .dsn import redact
from .exceptions import SchemaNotReady
from .job import FINISHED_STATES, ClaimedJob, JobBatch, JobRecord, JobState, NewJob, Outcome, Row
from .schema import SCHEMA_REVISION
from .sql import CLAIM_SESSION, PING, UNLISTEN_ALL, Queries

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from .rates import Rate

T = TypeVar("T")
#: The pseudo-state of ``queue_counts``: jobs that finished within the window.
RECENT = "recent"
#: Finished states with more jobs than this are estimated by ``queue_counts``, from SAMPLE_PAGES pages.
EXACT_UP_TO = 50_000
SAMPLE_PAGES = 1_000

#: The claim leaves out arguments whose text in Postgres takes more than this many times the limit.
#: Postgres' text adds a space after each ``,`` and ``:``, so the exact check (on compact JSON, as at
#: enqueue) is the worker's, on what it fetched; this margin only keeps it from fetching what is far over.
FETCH_MARGIN = 2

#: Finished ids per done-channel notification: 200 UUIDs stay under NOTIFY's 8000-byte payload limit.
ANNOUNCE_CHUNK = 200
#: Rows per ``Copy.write``: big enough to make the call cheap, small enough to overlap with Postgres.
COPY_CHUNK = 1000
#: The failure recorded on started jobs rescued from a worker that stopped heartbeating.
WORKER_LOST = failures.sql_template("WorkerLost", "the worker running this attempt stopped heartbeating")
#: A job whose worker died while running it this many times goes dead (it may be what kills its worker).
MAX_CRASHES = 3
#: Rescued jobs come back at a random moment within this many seconds (a crash batch is not re-claimed at once).
RESCUE_SPREAD = 2.0
KILLER_MESSAGE = (
    "the worker died while running it %s times (the job may kill its worker: os._exit, a crash in C code,"
    " the OOM killer); it goes dead instead of taking more workers down"
)


# -- what the statements return ------------------------------------------------------------------


@dataclass(frozen=True)
class Inserted:
    """One INSERT_JOB: whether the row was new, and whether it is due now."""

    inserted: bool
    due: bool


@dataclass(frozen=True)
class ThrottleSlot:
    """A place taken in a throttle window."""

    window_start: dt.datetime
    in_future: bool  # a window after the current one (a deferred call)


@dataclass(frozen=True)
class Copied:
    count: int
    due: bool  # the batch is due now (its queue should be woken)


@dataclass(frozen=True)
class CappedClaim:
    jobs: list[ClaimedJob]
    at_cap: bool  # the queue's concurrency cap, not the asked limit, bounded the claim


@dataclass(frozen=True)
class Finished:
    """What FINISH_JOBS changed."""

    changed: list[str]  # ids whose outcome was written (lease still held)
    finished: list[str]  # of those, the ones that ended (succeeded or dead)
    woken: list[str]  # queues that got a job back as available


@dataclass(frozen=True)
class Promoted:
    count: int
    next_due_in: float | None  # seconds until the next scheduled job is due (None: none is)


@dataclass(frozen=True)
class Rescued:
    count: int
    dead: list[str]  # ids that went dead: out of attempts, or their worker died while running them too often
    started: int = 0  # how many of them had started (charged an attempt); the others got theirs back


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself in its heartbeat."""

    id: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int


@dataclass(frozen=True)
class WorkerRow:
    id: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    alive: bool
    in_flight: int  # jobs it holds (running or claimed ahead), as of its last heartbeat


@dataclass(frozen=True)
class RateSlot:
    """A start a rate limiter reserved: ``wait`` seconds from now, at ``at`` (epoch seconds, its clock)."""

    wait: float
    at: float


@dataclass(frozen=True)
class TickState:
    schedule: str
    last_tick: dt.datetime  # the newest tick handled (fired, or the mark of first sight)
    last_fired: dt.datetime | None  # the newest tick that made a job


@dataclass(frozen=True)
class DeadJob:
    id: str
    task: str
    queue: str
    attempts: int
    died_at: dt.datetime | None
    error_type: str | None
    error_message: str | None


@dataclass(frozen=True)
class LimitCounts:
    throttled: int  # calls turned away by throttles (windows still kept)
    snoozed: int  # snoozes of jobs still kept


@dataclass(frozen=True)
class QueueDepth:
    """How many jobs of a queue are in a state; for ``available``, how long the oldest has been due."""

    queue: str
    state: str
    count: int
    oldest_seconds: float | None
    estimated: bool = False  # sampled (a finished state with too many rows to count at each call)


@dataclass(frozen=True)
class JobSummary:
    """One line of a job listing (``taskpg jobs``, the dashboard): the job without its payloads."""

    id: str
    task: str
    queue: str
    state: str
    attempt: int
    max_attempts: int
    priority: int
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    worker_id: str | None
    error_type: str | None
    error_message: str | None


@dataclass(frozen=True)
class BufferLosses:
    """Envelopes the buffer's Redis lost, as flushers saw them: the least total, in how many events, the latest."""

    lost: int
    events: int
    last_at: dt.datetime | None
    last_list: str | None
    last_cause: str | None


class _Shared:
    """What every Store of one app shares: the connections, the statements, the schema check."""

    def __init__(self, connections: Connections, queries: Queries) -> None:
        self.connections = connections
        self.queries = queries
        self.schema_checked = False
        self.lock = threading.Lock()


class Store:
    """Typed methods over the statements of ``sql.py`` for one schema."""

    def __init__(self, connections: Connections, schema: str, *, _shared: _Shared | None = None) -> None:
        self._shared = _shared or _Shared(connections, Queries(schema))
        self._conn: Conn | None = None
        self.q = self._shared.queries

    # -- where statements run --------------------------------------------------------------------

    @property
    def connections(self) -> Connections:
        return self._shared.connections

    @property
    def schema(self) -> str:
        return self.q.schema

    @property
    def bound(self) -> bool:
        """Whether statements run on one given connection (``on``) rather than on the pool."""
        return self._conn is not None

    def on(self, conn: Conn) -> Store:
        """This store, running every statement on ``conn`` (the caller's or a loop's connection)."""
        bound = Store(self._shared.connections, self.q.schema, _shared=self._shared)
        bound._conn = conn
        return bound

    def dedicated(self, name: str, *, for_claims: bool = False) -> Dedicated:
        """A connection of its own for one loop; ``for_claims`` adds the claim's planner setting."""
        return self.connections.dedicated(name, (CLAIM_SESSION,) if for_claims else ())

    def run(self, work: Callable[[Store], T], can_retry: Callable[[], bool] = lambda: True) -> T:
        """``work`` with a store bound to one connection: this store's, or a pooled one (tried once
        more after a lost connection while ``can_retry()`` says the work may be repeated)."""
        self.check_schema()
        if self._conn is not None:
            return work(self)
        return self.connections.run(lambda conn: work(self.on(conn)), can_retry)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """A block of statements that commit together (a savepoint inside a caller's transaction)."""
        self.check_schema()
        if self._conn is not None:
            with atomic(self._conn):
                yield self
            return
        with self.connections.pooled() as conn, atomic(conn):
            yield self.on(conn)

    def _one(self, statement: str, params: Mapping[str, Any] | None = None) -> tuple[Any, ...] | None:
        return self.run(lambda s: s._bound().execute(statement, params).fetchone())

    def _all(self, statement: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.run(lambda s: s._bound().execute(statement, params).fetchall())

    def _count(self, statement: str, params: Mapping[str, Any] | None = None) -> int:
        return self.run(lambda s: s._bound().execute(statement, params).rowcount)

    def _bound(self) -> Conn:
        assert self._conn is not None, "a statement ran on a store bound to no connection"
        return self._conn

    # -- schema ----------------------------------------------------------------------------------

    def schema_revision(self) -> str | None:
        """The Alembic revision of the schema, or None when taskpg was never migrated there."""
        try:
            with self.connections.direct() as conn:
                row = conn.execute(self.q.schema_version).fetchone()
        except pg_errors.UndefinedTable:
            return None
        return None if row is None else str(row[0])

    def check_schema(self) -> None:
        """Fail clearly when the database is not migrated to the revision this code needs (once)."""
        if self._shared.schema_checked:
            return
        with self._shared.lock:
            if self._shared.schema_checked:
                return
            found = self.schema_revision()
            if found != SCHEMA_REVISION:
                state = "is not migrated" if found is None else f"is at revision {found}"
                raise SchemaNotReady(
                    f"taskpg schema {self.schema!r} in {redact(self.connections.dsn)} {state}; this taskpg "
                    f"needs revision {SCHEMA_REVISION}: run `taskpg migrate` (or `alembic upgrade head`)"
                )
            self._shared.schema_checked = True

    # -- enqueue ---------------------------------------------------------------------------------

    def insert_job(self, job: NewJob, notify: bool) -> Inserted:
        """INSERT_JOB; ``notify`` wakes the queue's workers inside this transaction."""
        params = {
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
            "headers": job.headers,
            "links": job.links,
            "expires_at": job.expires if isinstance(job.expires, dt.datetime) else None,
            "expires_in": None if job.expires is None or isinstance(job.expires, dt.datetime) else job.expires,
            "channel": self.q.jobs_channel,
            "notify": notify,
        }
        row = self._one(self.q.insert_job, params)
        return Inserted(row is not None and row[0] == 1, row is not None and row[1] > 0)

    def spawn(self, templates: str) -> int:
        """Insert jobs from canvas templates (a JSON array); returns how many were new."""
        row = self._one(self.q.canvas_spawn, {"templates": templates})
        return int(row[0]) if row else 0

    def insert_chord(self, chord_id: str, size: int, body: str) -> None:
        """A chord of ``size`` header members and its body's template (JSON)."""
        self._count(self.q.insert_chord, {"id": chord_id, "size": size, "body": body})

    def active_unique(self, keys: Sequence[str]) -> dict[str, str]:
        """unique key -> id of the unfinished job holding it."""
        return {key: job_id for key, job_id in self._all(self.q.active_unique, {"keys": list(keys)})}

    def take_unique_lock(self, key: str, job_id: str, seconds: float) -> str:
        """``unique_for``: the id of the job that holds the key (``job_id`` itself when it got it)."""
        row = self._one(self.q.take_unique_lock, {"key": key, "job_id": job_id, "seconds": seconds})
        assert row is not None
        return str(row[0])

    def release_unique_lock(self, key: str, job_id: str) -> None:
        self._count(self.q.release_unique_lock, {"key": key, "job_id": job_id})

    def throttle_admit(self, task: str, key: str, rate: Rate, ahead: int) -> ThrottleSlot | None:
        """A place in the window ``ahead`` windows after the current one, or None when it is full."""
        params = {"task": task, "key": key, "period": rate.seconds, "limit": rate.count, "ahead": ahead}
        row = self._one(self.q.throttle_admit, params)
        return None if row is None else ThrottleSlot(row[0], bool(row[1]))

    def throttle_rejected(self, task: str, key: str, rate: Rate) -> None:
        """Count a call the throttle turned away."""
        self._count(self.q.throttle_rejected, {"task": task, "key": key, "period": rate.seconds})

    def copy_batch(self, batch: JobBatch, rows: Iterable[Row], run_at_default: bool) -> Copied:
        """COPY a batch as text lines. ``run_at_default``: a batch due now whose run_at may be the
        column's default, the start of this (the app's own) transaction.

        The lines are built here rather than by ``Copy.write_row``: the columns shared by the batch are
        formatted once, and the only text that needs COPY escaping is the JSON, whose only special
        character is the backslash (JSON encoders escape tabs, newlines and other control characters).
        """
        if run_at_default and batch.eta is None and not batch.countdown:
            statement, due, shared = self.q.copy_jobs_due_now, True, JobState.AVAILABLE.value
        else:  # run_at from the database clock, as for a single enqueue (or the eta as given)
            now = self.db_now()
            run_at = batch.eta or now + dt.timedelta(seconds=batch.countdown)
            due = run_at <= now
            state = JobState.AVAILABLE if due else JobState.SCHEDULED
            statement, shared = self.q.copy_jobs, f"{state}\t{run_at.isoformat()}"
        tail = f"\t{batch.task}\t{batch.queue}\t{batch.priority}\t{batch.max_attempts}\t{shared}\n"
        count = 0
        lines: list[str] = []
        with self._bound().cursor() as cur, cur.copy(statement) as copy:
            for job_id, args, kwargs in rows:
                lines.append(f"{job_id}\t{_copy_text(args)}\t{_copy_text(kwargs)}{tail}")
                if len(lines) == COPY_CHUNK:
                    copy.write("".join(lines))
                    count += COPY_CHUNK
                    lines.clear()
            copy.write("".join(lines))
        return Copied(count + len(lines), due)

    def copy_staged(self, jobs: Iterable[NewJob], dead_reasons: Mapping[str, str]) -> int:
        """Insert jobs that may already be in the table: COPY into a temporary staging table, then
        ``INSERT ... ON CONFLICT DO NOTHING`` (wakes the queues of new due jobs). Jobs named in
        ``dead_reasons`` are stored dead with an ``EnvelopeRejected`` failure; a job whose unique key
        an unfinished job holds is recorded as that job's duplicate. Returns how many were new. Run it
        inside ``transaction()``: the staging table empties at commit."""
        conn = self._bound()
        conn.execute(self.q.create_staging)
        now = self.db_now()
        unique = False
        with conn.cursor() as cur, cur.copy(self.q.copy_staging) as copy:
            for job in jobs:
                unique = unique or job.unique_key is not None
                run_at = job.eta or now + dt.timedelta(seconds=job.countdown)
                state = JobState.SCHEDULED if run_at > now else JobState.AVAILABLE
                errors, finished_at = "[]", None
                reason = dead_reasons.get(job.id)
                if reason is not None:
                    state, finished_at = JobState.DEAD, now
                    errors = codec.dumps([failures.record("EnvelopeRejected", reason, 0, at=now)])
                values = (job.id, job.task, job.queue, job.args, job.kwargs, job.priority, job.max_attempts)
                copy.write_row((*values, state.value, run_at, job.unique_key, errors, finished_at, job.headers))
        row = conn.execute(self.q.insert_from_staging, {"channel": self.q.jobs_channel}).fetchone()
        if unique:  # a job a unique key turned away: its handle is to lead to the holder
            conn.execute(self.q.record_duplicates)
        return int(row[0]) if row else 0

    def notify_queues(self, queues: Sequence[str]) -> None:
        """Wake the workers of these queues (inside this transaction)."""
        self._all(self.q.notify_queues, {"channel": self.q.jobs_channel, "queues": list(queues)})

    def db_now(self) -> dt.datetime:
        """The database clock."""
        row = self._one(self.q.db_now)
        assert row is not None
        now: dt.datetime = row[0]
        return now

    # -- results ---------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one(self.q.get_job, {"id": job_id})
        return None if row is None else JobRecord(*row)

    def first_failed(self, job_ids: Sequence[str]) -> JobRecord | None:
        """The first of these jobs that ended dead or cancelled, if one did."""
        row = self._one(self.q.first_failed, {"ids": list(job_ids)})
        return None if row is None else JobRecord(*row)

    def children(self, job_id: str) -> list[str]:
        """Ids of the jobs that the end of ``job_id`` inserted, oldest first."""
        return [row[0] for row in self._all(self.q.children, {"id": job_id})]

    def update_progress(self, job_id: str, said: Mapping[str, Any]) -> bool:
        """Merge what a running job says of itself (``state``/``meta``, or ``progress``) into its row, as
        JSON; False when the job is not running."""
        return self._count(self.q.update_progress, {"id": job_id, "progress": codec.dumps(dict(said))}) > 0

    def forget(self, job_id: str) -> bool:
        """Delete a finished job's row; True when it was deleted."""
        return self._count(self.q.forget_job, {"id": job_id}) > 0

    def revoke(self, job_id: str) -> bool:
        """Cancel a job that has not started; True when this call cancelled it."""
        return bool(self._all(self.q.revoke_job, {"id": job_id, "done_channel": self.q.done_channel}))

    def listen_for_jobs(self) -> None:
        """LISTEN on the channel announcing new due jobs (payload: the queue)."""
        self._count(self.q.listen(self.q.jobs_channel))

    def listen_for_finished(self) -> None:
        """LISTEN on the channel announcing finished jobs (payload: comma-separated ids)."""
        self._count(self.q.listen(self.q.done_channel))

    def listen_for_events(self) -> None:
        """LISTEN on the job events channel (payload: a JSON array of events, events.py)."""
        self._count(self.q.listen(self.q.events_channel))

    def publish_events(self, payloads: Sequence[str]) -> None:
        """NOTIFY each payload on the job events channel: in a savepoint of the caller's transaction
        when the store is bound to one (a failure leaves it usable; delivered at its commit)."""
        if payloads:
            with self.transaction() as tx:
                tx._one(self.q.publish_events, {"channel": self.q.events_channel, "payloads": list(payloads)})

    def unlisten(self) -> None:
        self._count(UNLISTEN_ALL)

    def notifications(self, timeout: float) -> Iterator[str]:
        """Payloads of notifications on the LISTENed channels as they arrive, for up to ``timeout`` s."""
        for note in self._bound().notifies(timeout=timeout):
            yield note.payload

    def probe(self, payload: str) -> None:
        """Send ``payload`` on the new-jobs channel: a listener checks with it that it still hears."""
        self._all(self.q.notify_queues, {"channel": self.q.jobs_channel, "queues": [payload]})

    def ping(self) -> None:
        """A round trip that reads nothing."""
        self._one(PING)

    # -- claim and finish ------------------------------------------------------------------------

    def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, max_bytes: int = codec.MAX_PAYLOAD_BYTES
    ) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs. Arguments whose text in Postgres takes more than
        ``max_bytes * FETCH_MARGIN`` bytes are not fetched: the job comes with ``oversize`` set."""
        fetch_limit = max_bytes * FETCH_MARGIN
        params = {
            "queues": list(queues),
            "limit": limit,
            "worker_id": worker_id,
            "fetch_limit": fetch_limit,
            "done_channel": self.q.done_channel,
            "jobs_channel": self.q.jobs_channel,
        }
        return [ClaimedJob(*row) for row in self._all(self.q.claim_jobs, params)]

    def claim_capped(
        self, queue: str, cap: int, limit: int, worker_id: str, max_bytes: int = codec.MAX_PAYLOAD_BYTES
    ) -> CappedClaim:
        """Claim from a queue with a global concurrency cap: under the queue's advisory lock, count
        its running jobs and claim only what the cap leaves."""

        def work(s: Store) -> CappedClaim:
            with s.transaction():
                conn = s._bound()
                conn.execute(s.q.advisory_xact_lock, {"name": f"taskpg:{s.schema}:queue:{queue}"})
                row = conn.execute(s.q.running_in_queue, {"queue": queue}).fetchone()
                room = cap - int(row[0] if row else 0)
                if room <= 0:
                    return CappedClaim([], True)
                return CappedClaim(s.claim([queue], min(limit, room), worker_id, max_bytes), room <= limit)

        return self.run(work)

    def finish(self, outcomes: Sequence[Outcome]) -> Finished:
        """FINISH_JOBS for a batch (no NOTIFY: ``announce`` after the commit)."""
        row = self._one(self.q.finish_jobs, {"outcomes": outcomes_json(outcomes)})
        changed, finished, woken = row if row else ([], [], [])
        return Finished(list(changed), list(finished), list(woken))

    def lease_held(self, job: ClaimedJob) -> bool:
        """Whether ``job``'s attempt still holds it (running, with this lease)."""
        row = self._one(self.q.lease_held, {"id": job.id, "lease": job.lease})
        return bool(row and row[0])

    def announce(self, finished: Sequence[str], queues: Sequence[str]) -> None:
        """Tell ``get()`` waiters about finished jobs and wake the workers of ``queues`` (after a commit)."""
        chunks = [",".join(finished[i : i + ANNOUNCE_CHUNK]) for i in range(0, len(finished), ANNOUNCE_CHUNK)]
        params = {
            "payloads": chunks,
            "queues": list(queues),
            "done_channel": self.q.done_channel,
            "jobs_channel": self.q.jobs_channel,
        }
        self._one(self.q.announce, params)

    def promote_due(self, limit: int = 10_000) -> Promoted:
        """Make due scheduled jobs available and wake their queues."""
        row = self._one(self.q.promote_due, {"limit": limit, "channel": self.q.jobs_channel})
        assert row is not None
        return Promoted(int(row[0]), None if row[2] is None else float(row[2]))

    def make_due(self, queues: Sequence[str]) -> int:
        """Make every scheduled job of ``queues`` available now (taskpg.testing's ``with_scheduled``)."""
        row = self._one(self.q.make_due, {"queues": list(queues)})
        return int(row[0]) if row else 0

    def drop_test_schema(self, prefix: str) -> None:
        """Drop this schema, which a test made (its name must start with ``prefix``)."""
        if not self.schema.startswith(prefix):
            raise ValueError(f"schema {self.schema!r} was not made by a test: it is not dropped")
        with self.connections.direct() as conn:
            conn.execute(self.q.drop_test_schema)

    # -- workers, rescue -------------------------------------------------------------------------

    def heartbeat(self, worker: WorkerInfo) -> None:
        params = {
            "id": worker.id,
            "hostname": worker.hostname,
            "pid": worker.pid,
            "queues": worker.queues,
            "concurrency": worker.concurrency,
        }
        self._count(self.q.heartbeat, params)

    def delete_worker(self, worker_id: str) -> None:
        self._count(self.q.delete_worker, {"id": worker_id})

    def record_running(self, worker_id: str, running: Sequence[str]) -> bool:
        """Record the jobs this worker has started and not finished; False when its row is not there yet."""
        return self._count(self.q.record_running, {"id": worker_id, "running": list(running)}) == 1

    def rescue(self, after: float) -> Rescued:
        """Put back running jobs of workers silent for ``after`` seconds: started ones charged (dead when out
        of attempts or after MAX_CRASHES), the others with their attempt back; spread over RESCUE_SPREAD s."""
        params = {
            "after": after,
            "error": WORKER_LOST,
            "max_crashes": MAX_CRASHES,
            "killer_message": KILLER_MESSAGE,
            "spread": RESCUE_SPREAD,
        }
        row = self._one(self.q.rescue_jobs, params)
        if row is None:
            return Rescued(0, [])
        return Rescued(int(row[0]), [str(i) for i in row[2] or []], int(row[1]))

    def release_unknown(self, worker_id: str, held: Sequence[str]) -> int:
        """Jobs the database says this worker holds but the worker does not know go back."""
        return self._count(self.q.release_unknown, {"worker_id": worker_id, "held": list(held)})

    def delete_stale_workers(self, after: float) -> None:
        self._count(self.q.delete_stale_workers, {"after": after})

    def list_workers(self, alive_within: float) -> list[WorkerRow]:
        return [WorkerRow(*row) for row in self._all(self.q.list_workers, {"alive_within": alive_within})]

    # -- rate limits -----------------------------------------------------------------------------

    def rate_reserve(self, key: str, interval: float) -> RateSlot:
        """Reserve the next start of a limiter key whose starts are ``interval`` seconds apart."""
        row = self._one(self.q.rate_reserve, {"key": key, "interval": interval})
        assert row is not None
        return RateSlot(float(row[0]), float(row[1]))

    # -- periodic schedules ----------------------------------------------------------------------

    def try_lead(self, key: str) -> bool:
        """Take beat's session-level leader lock on this connection, if free."""
        row = self._one(self.q.try_beat_leader, {"key": key})
        return bool(row and row[0])

    def last_ticks(self, schedules: Sequence[str]) -> list[TickState]:
        return [TickState(*row) for row in self._all(self.q.last_ticks, {"schedules": list(schedules)})]

    def claim_tick(self, schedule: str, tick: dt.datetime, job_id: str | None) -> bool:
        """Insert (schedule, tick); True for the one claimant the primary key lets in."""
        return self._one(self.q.claim_tick, {"schedule": schedule, "tick": tick, "job_id": job_id}) is not None

    def set_tick_job(self, schedule: str, tick: dt.datetime, job_id: str | None) -> None:
        self._count(self.q.set_tick_job, {"schedule": schedule, "tick": tick, "job_id": job_id})

    # -- retention -------------------------------------------------------------------------------

    def prune_by_age(self, state: JobState, age: float, queue: str | None, others: Sequence[str], batch: int) -> int:
        """Delete up to ``batch`` jobs in ``state`` finished over ``age`` s ago (of ``queue``, or of
        every queue but ``others``)."""
        params = {"state": state.value, "age": age, "queue": queue, "other_queues": list(others), "batch": batch}
        return self._count(self.q.prune_by_age, params)

    def prune_by_count(self, state: JobState, keep: int, queue: str | None, others: Sequence[str], batch: int) -> int:
        """Delete up to ``batch`` jobs in ``state`` beyond the newest ``keep`` per queue."""
        params = {"state": state.value, "keep": keep, "queue": queue, "other_queues": list(others), "batch": batch}
        return self._count(self.q.prune_by_count, params)

    def prune_ticks(self, age: float) -> None:
        self._count(self.q.prune_ticks, {"age": age})

    def prune_limits(self) -> None:
        """Drop throttle windows, unique locks and rate events that have run out."""
        self._one(self.q.prune_limits)

    def autovacuum_active(self) -> bool:
        """Whether autovacuum looks after the jobs table (server setting, statistics, table option)."""
        table = pg_sql.Identifier(self.schema, "jobs").as_string()
        row = self._one(self.q.autovacuum_active, {"table": table})
        return bool(row and row[0])

    def vacuum_jobs(self) -> None:
        """VACUUM (ANALYZE) the jobs table (on an autocommit connection: not inside a transaction)."""
        self._count(self.q.vacuum_jobs)

    # -- operations ------------------------------------------------------------------------------

    def job_counts(self) -> dict[str, dict[str, int]]:
        """queue -> state -> number of jobs (finished states with very many rows: estimated)."""
        counts: dict[str, dict[str, int]] = {}
        for row in self.queue_counts(0.0):
            if row.state != RECENT:
                counts.setdefault(row.queue, {})[row.state] = row.count
        return counts

    def queue_counts(self, window: float, exact_up_to: int = EXACT_UP_TO) -> list[QueueDepth]:
        """Jobs per queue and state, plus state ``recent``: jobs finished within ``window`` seconds.

        A finished state (succeeded, dead, cancelled) holding more than ``exact_up_to`` jobs is not
        counted row by row at each call: its counts are estimated from a sample of the table's pages
        (``estimated`` set), so the call stays fast with millions of kept jobs."""
        rows = [QueueDepth(q, s, int(n), age) for q, s, n, age in self._all(self.q.queue_counts, {"window": window})]
        for state in sorted(FINISHED_STATES):
            over = self._one(self.q.finished_over, {"state": state.value, "cap": exact_up_to})
            if not (over and over[0]):
                found = self._all(self.q.finished_counts, {"state": state.value})
                rows += [QueueDepth(q, state.value, int(n), None) for q, n in found]
                continue
            pages = self._one(self.q.table_pages, {"table": pg_sql.Identifier(self.schema, "jobs").as_string()})
            percent = min(100.0, 100.0 * SAMPLE_PAGES / max(1, int(pages[0] if pages else 1)))
            found = self._all(self.q.finished_sample, {"state": state.value, "percent": percent})
            rows += [QueueDepth(q, state.value, round(int(n) * 100.0 / percent), None, True) for q, n in found]
        return rows

    def pause_queue(self, queue: str) -> bool:
        """Stop every claim of ``queue``'s jobs; False when it was paused already."""
        return self._count(self.q.pause_queue, {"queue": queue}) == 1

    def resume_queue(self, queue: str) -> bool:
        """Let ``queue``'s jobs be claimed again and wake its workers; False when it was not paused."""
        return bool(self._all(self.q.resume_queue, {"queue": queue, "channel": self.q.jobs_channel}))

    def paused_queues(self) -> dict[str, dt.datetime]:
        """Paused queue -> when it was paused."""
        return {queue: at for queue, at in self._all(self.q.paused_queues)}

    def count_waiting(self, queues: Sequence[str] | None, task: str | None) -> int:
        row = self._one(self.q.count_waiting, {"queues": _list_or_none(queues), "task": task})
        return int(row[0]) if row else 0

    def purge_waiting(self, queues: Sequence[str] | None, task: str | None) -> list[str]:
        """Cancel the waiting (available and scheduled) jobs of ``queues``/``task``; their ids, announced."""
        rows = self._all(self.q.purge_waiting, {"queues": _list_or_none(queues), "task": task})
        ids = [row[0] for row in rows]
        self.announce(ids, [])
        return ids

    def list_jobs(
        self,
        state: JobState,
        queues: Sequence[str] | None = None,
        task: str | None = None,
        id_prefix: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobSummary]:
        """Jobs in ``state`` (finished ones newest first, others in run order), filtered."""
        params = {
            "state": state.value,
            "queues": _list_or_none(queues),
            "task": task,
            "id_prefix": id_prefix,
            "limit": limit,
            "offset": offset,
        }
        return [JobSummary(*row) for row in self._all(self.q.list_jobs[state.value], params)]

    def mark_demo_schema(self) -> None:
        """Mark this schema as made by ``taskpg demo`` (the only kind of schema the demo may reset)."""
        self._count(self.q.mark_demo_schema)

    def is_demo_schema(self) -> bool:
        """Whether ``taskpg demo`` made this schema; asked before any migration, so whatever revision the
        schema is at (the demo upgrades its own schemas, and no other)."""
        with self.connections.direct() as conn:
            row = conn.execute(self.q.is_demo_schema, {"schema": self.schema}).fetchone()
        return bool(row and row[0])

    def queue_depths(self) -> list[QueueDepth]:
        """Jobs per queue in the states metrics report (each read through its partial index)."""
        return [QueueDepth(q, s, int(n), age) for q, s, n, age in self._all(self.q.queue_depths)]

    def record_buffer_loss(self, list_name: str, lost: int, cause: str) -> None:
        self._count(self.q.record_buffer_loss, {"list_name": list_name, "lost": lost, "cause": cause})

    def buffer_losses(self) -> BufferLosses:
        row = self._one(self.q.buffer_losses)
        assert row is not None
        return BufferLosses(int(row[0]), int(row[1]), row[2], row[3], row[4])

    def limit_counts(self) -> dict[str, LimitCounts]:
        """task -> calls turned away by throttles and snoozes of kept jobs."""
        rows = self._all(self.q.task_limit_stats)
        return {task: LimitCounts(int(throttled), int(snoozed)) for task, throttled, snoozed in rows}

    def dead_list(self, queue: str | None, task: str | None, limit: int) -> list[DeadJob]:
        """Dead jobs, newest first, with the last error of each."""
        return [DeadJob(*row) for row in self._all(self.q.dead_list, {"queue": queue, "task": task, "limit": limit})]

    def dead_retry(self, ids: Sequence[str] | None, queue: str | None, task: str | None) -> int:
        """Make dead jobs available again with fresh attempts; returns how many."""
        params = {
            "ids": None if ids is None else list(ids),
            "queue": queue,
            "task": task,
            "channel": self.q.jobs_channel,
        }
        row = self._one(self.q.dead_retry, params)
        return int(row[0]) if row else 0

    def dead_purge(
        self, older_than: float, queue: str | None, task: str | None, ids: Sequence[str] | None = None
    ) -> int:
        """Delete dead jobs older than ``older_than`` seconds (only those of ``ids`` if given)."""
        params = {"older_than": older_than, "queue": queue, "task": task, "ids": _list_or_none(ids)}
        return self._count(self.q.dead_purge, params)

    def copy_to_queue(self, job_id: str, new_id: str, queue: str) -> None:
        """A copy of a job, error history included, as a new available job in ``queue``."""
        params = {"id": job_id, "new_id": new_id, "queue": queue, "channel": self.q.jobs_channel}
        self._all(self.q.copy_to_queue, params)


def _list_or_none(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else list(values)


def outcomes_json(batch: Sequence[Outcome]) -> str:
    """The batch as the JSON array ``FINISH_JOBS`` reads: keys with default values are left out.

    Built as text: ids, leases and states are plain ASCII, results and errors are JSON already.
    """
    items = []
    for outcome in batch:
        job = outcome.job
        item = f'{{"id":"{job.id}","lease":"{job.lease}","state":"{outcome.state.value}"'
        if outcome.result is not None:
            item += f',"result":{outcome.result}'
        if outcome.error is not None:
            item += f',"error":{json.dumps(outcome.error, default=str)}'
        if outcome.delay:
            item += f',"delay":{float(outcome.delay)!r}'
        if outcome.refund:
            item += f',"refund":{int(outcome.refund)}'
        if outcome.snoozed:
            item += f',"snoozed":{int(outcome.snoozed)}'
        if outcome.keep_place:
            item += ',"keep_place":1'
        if outcome.slot_at is not None and outcome.wake_at is not None:
            item += f',"slot_at":{float(outcome.slot_at)!r},"wake_at":{float(outcome.wake_at)!r}'
        items.append(item + "}")
    return "[" + ",".join(items) + "]"


def _copy_text(json_text: str) -> str:
    """JSON text as a field of COPY's text format (task and queue names never need escaping)."""
    return json_text.replace("\\", "\\\\")
