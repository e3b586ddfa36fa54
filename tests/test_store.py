"""The store against real Postgres: every statement group of ``sql.py`` through its ``Store`` method.

Rows are read back with a plain connection (``db``) where the method's return value alone would not
show that the statement did the right thing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import JobState, SchemaNotReady, TaskPG, failures, migrate
from taskpg.connections import Connections
from taskpg.job import JobBatch, JobRecord, NewJob, Outcome, job_id_sequence, new_job_id
from taskpg.rates import Rate
from taskpg.schema import SCHEMA_REVISION
from taskpg.store import (
    ANNOUNCE_CHUNK,
    COPY_CHUNK,
    MAX_CRASHES,
    RESCUE_SPREAD,
    CappedClaim,
    Copied,
    DeadJob,
    Finished,
    Inserted,
    LimitCounts,
    Promoted,
    Rescued,
    Store,
    TickState,
    WorkerInfo,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from taskpg.job import ClaimedJob

UTC = dt.timezone.utc
WEEK = 7 * 86400.0  # throttle windows this long are not crossed while a test runs


# -- helpers -------------------------------------------------------------------------------------


def new_job(
    task: str = "tests.t",
    queue: str = "q",
    *,
    args: str = "[1]",
    kwargs: str = "{}",
    priority: int = 0,
    max_attempts: int = 3,
    **options: Any,
) -> NewJob:
    return NewJob(new_job_id(), task, queue, args, kwargs, priority, max_attempts, **options)


def add(store: Store, **fields: Any) -> NewJob:
    """Insert a new job (no NOTIFY) and return it."""
    job = new_job(**fields)
    assert store.insert_job(job, notify=False).inserted
    return job


def claim_one(store: Store, job: NewJob, worker_id: str = "w1") -> ClaimedJob:
    """Claim ``job`` (the only available job of its queue)."""
    (claimed,) = store.claim([job.queue], 10, worker_id)
    assert claimed.id == job.id
    return claimed


def one(db: psycopg.Connection, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
    row = db.execute(query, params).fetchone()
    assert row is not None, query
    return row


def cols(db: psycopg.Connection, app: TaskPG, job_id: str, columns: str) -> tuple[Any, ...]:
    """Some columns of one job row."""
    return one(db, f'SELECT {columns} FROM "{app.schema}".jobs WHERE id = %s', (job_id,))


def ids_in(db: psycopg.Connection, app: TaskPG, where: str = "true") -> set[str]:
    return {r[0] for r in db.execute(f'SELECT id::text FROM "{app.schema}".jobs WHERE {where}').fetchall()}


def set_finished(db: psycopg.Connection, app: TaskPG, job_ids: Sequence[str], state: JobState, age: float) -> None:
    """Mark jobs finished in ``state``, ``age`` seconds ago."""
    db.execute(
        f'UPDATE "{app.schema}".jobs SET state = %s, finished_at = now() - make_interval(secs => %s) '
        "WHERE id = ANY(%s::uuid[])",
        (state.value, age, list(job_ids)),
    )


def payloads_until(listener: Store, last: str, timeout: float = 10.0) -> list[str]:
    """Notification payloads on the listener's channels, up to and including ``last``.

    Notifications of separate transactions arrive in commit order, so once ``last`` (sent after the
    statements under test) is here, any payload those statements sent is here too.
    """
    seen: list[str] = []
    for payload in listener.notifications(timeout):
        seen.append(payload)
        if payload == last:
            return seen
    raise AssertionError(f"no {last!r} notification within {timeout} s (got {seen})")


@pytest.fixture
def listen_conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """A dedicated autocommit connection for LISTEN."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def listener(app: TaskPG, listen_conn: psycopg.Connection) -> Store:
    """The app's store bound to a connection of its own (as a listening loop holds it)."""
    return app.store.on(listen_conn)


# -- enqueue -------------------------------------------------------------------------------------


def test_insert_job_writes_an_available_row(app: TaskPG, db: psycopg.Connection) -> None:
    job = new_job("tests.send", "emails", args='[7, "x"]', kwargs='{"subject": "hi"}', priority=3, max_attempts=5)
    assert app.store.insert_job(job, notify=False) == Inserted(inserted=True, due=True)
    row = cols(db, app, job.id, "task, queue, args, kwargs, priority, max_attempts, state, attempt, run_at <= now()")
    assert row == ("tests.send", "emails", [7, "x"], {"subject": "hi"}, 3, 5, "available", 0, True)


def test_insert_job_with_countdown_eta_or_not_before_is_scheduled(app: TaskPG, db: psycopg.Connection) -> None:
    now = app.store.db_now()
    later = new_job(countdown=3600)
    at_eta = new_job(eta=now + dt.timedelta(hours=2))
    past_eta = new_job(eta=now - dt.timedelta(minutes=1))
    held_back = new_job(not_before=now + dt.timedelta(hours=1))  # a throttled job deferred to its window
    results = {job.id: app.store.insert_job(job, notify=False) for job in (later, at_eta, past_eta, held_back)}

    assert results[later.id] == Inserted(True, due=False)
    assert results[at_eta.id] == Inserted(True, due=False)
    assert results[past_eta.id] == Inserted(True, due=True)
    assert results[held_back.id] == Inserted(True, due=False)
    assert cols(db, app, later.id, "state, run_at > now() + interval '50 minutes'") == ("scheduled", True)
    assert cols(db, app, at_eta.id, "state, run_at") == ("scheduled", at_eta.eta)
    assert cols(db, app, past_eta.id, "state, run_at") == ("available", past_eta.eta)
    assert cols(db, app, held_back.id, "state, run_at") == ("scheduled", held_back.not_before)


def test_insert_job_twice_with_one_id_is_a_no_op(app: TaskPG, db: psycopg.Connection) -> None:
    job = new_job(args="[1]")
    assert app.store.insert_job(job, notify=False).inserted
    again = dataclasses.replace(job, args="[2]")  # a retry whose first reply was lost
    assert app.store.insert_job(again, notify=True) == Inserted(inserted=False, due=False)
    assert db.execute(f'SELECT args FROM "{app.schema}".jobs').fetchall() == [([1],)]


def test_insert_job_notifies_the_queue_only_when_asked(app: TaskPG, listener: Store) -> None:
    listener.listen_for_jobs()
    app.store.insert_job(new_job(queue="quiet"), notify=False)
    app.store.insert_job(new_job(queue="later", countdown=3600), notify=True)  # not due: nothing to wake
    app.store.insert_job(new_job(queue="loud"), notify=True)
    assert payloads_until(listener, "loud") == ["loud"]


def test_unique_key_defers_to_the_unfinished_holder(app: TaskPG, db: psycopg.Connection) -> None:
    first = add(app.store, unique_key="report:1")
    second = new_job(unique_key="report:1")
    assert app.store.insert_job(second, notify=False) == Inserted(inserted=False, due=False)
    assert app.store.active_unique(["report:1", "report:2"]) == {"report:1": first.id}

    set_finished(db, app, [first.id], JobState.SUCCEEDED, 0)  # a finished job holds its key no more
    assert app.store.active_unique(["report:1"]) == {}
    assert app.store.insert_job(second, notify=False).inserted


def test_unique_lock_is_held_until_released_or_run_out(app: TaskPG) -> None:
    store = app.store
    a, b, c = new_job_id(), new_job_id(), new_job_id()
    assert store.take_unique_lock("k", a, 3600) == a
    assert store.take_unique_lock("k", b, 3600) == a  # a holds it
    store.release_unique_lock("k", b)  # not b's to release
    assert store.take_unique_lock("k", b, 3600) == a
    store.release_unique_lock("k", a)
    assert store.take_unique_lock("k", b, 0) == b
    assert store.take_unique_lock("k", c, 3600) == c  # b's time (0 s) has run out


def test_throttle_admits_up_to_the_limit_per_window(app: TaskPG, db: psycopg.Connection) -> None:
    store, rate = app.store, Rate(2, WEEK)
    first = store.throttle_admit("tests.t", "k", rate, ahead=0)
    second = store.throttle_admit("tests.t", "k", rate, ahead=0)
    assert first is not None and second is not None
    assert not first.in_future and second.window_start == first.window_start
    assert first.window_start <= store.db_now()
    assert store.throttle_admit("tests.t", "k", rate, ahead=0) is None  # the window is full
    store.throttle_rejected("tests.t", "k", rate)

    deferred = store.throttle_admit("tests.t", "k", rate, ahead=1)
    assert deferred is not None and deferred.in_future
    assert deferred.window_start == first.window_start + dt.timedelta(seconds=WEEK)
    other_key = store.throttle_admit("tests.t", "other", rate, ahead=0)
    assert other_key is not None and not other_key.in_future

    rows = db.execute(
        f'SELECT key, window_start, used, rejected FROM "{app.schema}".throttle_windows ORDER BY key, window_start'
    ).fetchall()
    assert rows == [
        ("k", first.window_start, 2, 1),
        ("k", deferred.window_start, 1, 0),
        ("other", first.window_start, 1, 0),
    ]


def test_copy_batch_due_now_takes_the_transaction_start(app: TaskPG, db: psycopg.Connection) -> None:
    rows = [(new_job_id(), f"[{n}]", "{}") for n in range(3)]
    batch = JobBatch("tests.bulk", "bulk", priority=2, max_attempts=4, rows=rows)
    with app.store.transaction() as tx:
        assert tx.bound
        assert tx.copy_batch(batch, batch.rows, run_at_default=True) == Copied(3, due=True)
    what = "id::text, args::text, task, queue, priority, max_attempts, state, run_at = created_at"
    stored = db.execute(f'SELECT {what} FROM "{app.schema}".jobs').fetchall()
    expected = {(job_id, args, "tests.bulk", "bulk", 2, 4, "available", True) for job_id, args, _ in rows}
    assert set(stored) == expected  # run_at is the column default: the start of the transaction


def test_copy_batch_with_countdown_or_eta_takes_run_at_from_the_database(app: TaskPG, db: psycopg.Connection) -> None:
    later_id, past_id = new_job_id(), new_job_id()
    later = JobBatch("tests.bulk", "bulk", 0, 1, rows=[(later_id, "[]", "{}")], countdown=3600)
    eta = app.store.db_now() - dt.timedelta(minutes=5)
    past = JobBatch("tests.bulk", "bulk", 0, 1, rows=[(past_id, "[]", "{}")], eta=eta)
    with app.store.transaction() as tx:
        assert tx.copy_batch(later, later.rows, run_at_default=True) == Copied(1, due=False)
        assert tx.copy_batch(past, past.rows, run_at_default=False) == Copied(1, due=True)
    assert cols(db, app, later_id, "state, run_at > now() + interval '50 minutes'") == ("scheduled", True)
    assert cols(db, app, past_id, "state, run_at") == ("available", eta)


def test_copy_batch_escapes_backslashes_across_chunks(app: TaskPG, db: psycopg.Connection) -> None:
    """More rows than one COPY write holds, with JSON whose escapes must survive COPY's text format."""
    ids = job_id_sequence()
    count = COPY_CHUNK + 500
    rows = [(next(ids), '["C:\\\\dir", "tab\\there", "\\u00e9"]', f'{{"n": {n}}}') for n in range(count)]
    batch = JobBatch("tests.bulk", "bulk", 0, 1, rows=rows)
    with app.store.transaction() as tx:
        assert tx.copy_batch(batch, batch.rows, run_at_default=True).count == count
    assert one(db, f'SELECT count(*), count(DISTINCT id) FROM "{app.schema}".jobs') == (count, count)
    assert cols(db, app, rows[-1][0], "args, kwargs") == (["C:\\dir", "tab\there", "é"], {"n": count - 1})


def test_copy_staged_is_idempotent_and_stores_rejected_envelopes_dead(app: TaskPG, db: psycopg.Connection) -> None:
    due, later, rejected = new_job(), new_job(countdown=3600), new_job(queue="other")
    jobs = [due, later, rejected]
    reasons = {rejected.id: "the envelope's signature does not match"}
    with app.store.transaction() as tx:
        assert tx.copy_staged(jobs, reasons) == 3
    with app.store.transaction() as tx:  # the same batch flushed again
        assert tx.copy_staged(jobs, reasons) == 0

    assert one(db, f'SELECT count(*) FROM "{app.schema}".jobs') == (3,)
    assert cols(db, app, due.id, "state, finished_at") == ("available", None)
    assert cols(db, app, later.id, "state, run_at > now() + interval '50 minutes'") == ("scheduled", True)
    state, finished, errors = cols(db, app, rejected.id, "state, finished_at IS NOT NULL, errors")
    assert (state, finished, len(errors)) == ("dead", True, 1)
    assert errors[0]["type"] == "EnvelopeRejected"
    assert errors[0]["message"] == "the envelope's signature does not match"
    assert errors[0]["attempt"] == 0


def test_notify_queues_wakes_each_queue(app: TaskPG, listener: Store) -> None:
    listener.listen_for_jobs()
    app.store.notify_queues(["a", "b"])
    app.store.announce([], ["c"])  # after a commit: wakes queues too
    app.store.notify_queues(["done"])
    assert payloads_until(listener, "done") == ["a", "b", "c", "done"]


def test_db_now_is_the_database_clock(app: TaskPG, db: psycopg.Connection) -> None:
    (before,) = one(db, "SELECT clock_timestamp()")
    now = app.store.db_now()
    (after,) = one(db, "SELECT clock_timestamp()")
    assert now.tzinfo is not None
    assert before <= now <= after


# -- results -------------------------------------------------------------------------------------


def test_get_job_reads_every_field(app: TaskPG) -> None:
    assert app.store.get_job(str(uuid.uuid4())) is None
    job = add(app.store, task="tests.get", queue="reads", args='[1, "a"]', kwargs='{"x": 2}', priority=4)
    record = app.store.get_job(job.id)
    assert isinstance(record, JobRecord)
    assert (record.id, record.task, record.queue, record.state) == (job.id, "tests.get", "reads", "available")
    assert (record.attempt, record.max_attempts, record.snoozes, record.priority) == (0, 3, 0, 4)
    assert (record.args, record.kwargs, record.result, record.errors) == ([1, "a"], {"x": 2}, None, [])
    assert record.run_at <= app.store.db_now() and record.created_at <= app.store.db_now()
    assert (record.started_at, record.finished_at, record.worker_id) == (None, None, None)

    claim_one(app.store, job, "w-get")
    running = app.store.get_job(job.id)
    assert running is not None
    assert (running.state, running.attempt, running.worker_id) == ("running", 1, "w-get")
    assert running.started_at is not None


def test_revoke_cancels_only_jobs_that_have_not_started(app: TaskPG, db: psycopg.Connection) -> None:
    available, scheduled = add(app.store), add(app.store, countdown=3600)
    running = add(app.store, queue="busy")
    claim_one(app.store, running)

    assert app.store.revoke(available.id) is True
    assert app.store.revoke(scheduled.id) is True
    assert app.store.revoke(available.id) is False  # already cancelled
    assert app.store.revoke(running.id) is False
    assert app.store.revoke(str(uuid.uuid4())) is False
    assert cols(db, app, available.id, "state, finished_at IS NOT NULL") == ("cancelled", True)
    assert cols(db, app, scheduled.id, "state") == ("cancelled",)
    assert cols(db, app, running.id, "state") == ("running",)


def test_finished_ids_reach_a_listener(app: TaskPG, listener: Store) -> None:
    listener.listen_for_finished()
    listener.ping()
    one_id = new_job_id()
    app.store.announce([one_id], [])
    assert payloads_until(listener, one_id) == [one_id]

    many = [new_job_id() for _ in range(ANNOUNCE_CHUNK + 50)]  # two payloads: NOTIFY's size limit
    app.store.announce(many, [])
    last = ",".join(many[ANNOUNCE_CHUNK:])
    assert payloads_until(listener, last) == [",".join(many[:ANNOUNCE_CHUNK]), last]

    job = add(app.store)
    app.store.revoke(job.id)  # a revoked job is finished too
    assert payloads_until(listener, job.id) == [job.id]


def test_unlisten_stops_notifications(app: TaskPG, listener: Store) -> None:
    listener.listen_for_finished()
    listener.unlisten()
    listener.listen_for_jobs()
    finished = new_job_id()
    app.store.announce([finished], [])  # on the done channel, no longer listened to
    app.store.notify_queues(["sentinel"])  # committed after it: arrives after it
    assert payloads_until(listener, "sentinel") == ["sentinel"]


def test_ping_notices_a_lost_session(app: TaskPG, db: psycopg.Connection, pg_dsn: str) -> None:
    app.store.ping()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        bound = app.store.on(conn)
        bound.ping()
        db.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):  # a round trip, not a look at local state
            bound.ping()


# -- claim and finish ----------------------------------------------------------------------------


def test_claim_takes_jobs_in_priority_order_and_sets_the_lease(app: TaskPG, db: psycopg.Connection) -> None:
    low, high, mid = add(app.store, priority=0), add(app.store, priority=5), add(app.store, priority=1)
    add(app.store, countdown=3600, priority=9)  # scheduled: not claimable
    add(app.store, queue="unserved", priority=9)

    claimed = app.store.claim(["q"], 2, "w1")
    assert {job.id for job in claimed} == {high.id, mid.id}
    for job in claimed:
        assert (job.attempt, job.max_attempts, job.snoozes, job.task, job.queue) == (1, 3, 0, "tests.t", "q")
        assert (job.args, job.kwargs) == ("[1]", "{}")
        assert cols(db, app, job.id, "state, attempt, worker_id, lease::text, started_at IS NOT NULL") == (
            "running",
            1,
            "w1",
            job.lease,
            True,
        )
    assert len({job.lease for job in claimed}) == 2
    assert [job.id for job in app.store.claim(["q"], 2, "w1")] == [low.id]
    assert app.store.claim(["q"], 2, "w1") == []


def test_claim_across_queues_takes_the_best_of_all(app: TaskPG) -> None:
    add(app.store, queue="a", priority=0)
    urgent = add(app.store, queue="b", priority=9)
    assert [job.id for job in app.store.claim(["a", "b"], 1, "w1")] == [urgent.id]


def test_a_second_claim_counts_a_new_attempt_with_a_new_lease(app: TaskPG) -> None:
    job = add(app.store)
    first = claim_one(app.store, job)
    handed_back = app.store.finish([Outcome(first, JobState.AVAILABLE)])
    assert handed_back == Finished(changed=[job.id], finished=[], woken=["q"])
    second = claim_one(app.store, job, "w2")
    assert second.attempt == 2 and second.lease != first.lease


def test_claim_capped_respects_the_queue_cap(app: TaskPG) -> None:
    for _ in range(5):
        add(app.store, queue="capped")
    first = app.store.claim_capped("capped", cap=2, limit=5, worker_id="w1")
    assert isinstance(first, CappedClaim)
    assert (len(first.jobs), first.at_cap) == (2, True)
    assert app.store.claim_capped("capped", cap=2, limit=5, worker_id="w2") == CappedClaim([], True)

    roomy = app.store.claim_capped("capped", cap=10, limit=1, worker_id="w3")  # the asked limit bounds it
    assert (len(roomy.jobs), roomy.at_cap) == (1, False)


def test_finish_writes_each_outcome_of_a_batch(app: TaskPG, db: psycopg.Connection) -> None:
    done, retried, dead, snoozed = (add(app.store) for _ in range(4))
    claimed = {job.id: job for job in app.store.claim(["q"], 10, "w1")}
    error = failures.record("ValueError", "boom", 1, "w1")
    outcomes = [
        Outcome(claimed[done.id], JobState.SUCCEEDED, result='{"ok": [1, 2]}'),
        Outcome(claimed[retried.id], JobState.SCHEDULED, delay=3600, error=error),
        Outcome(claimed[dead.id], JobState.DEAD, error=error),
        Outcome(claimed[snoozed.id], JobState.SCHEDULED, delay=60, refund=1, snoozed=1),
    ]
    finished = app.store.finish(outcomes)
    assert sorted(finished.changed) == sorted(claimed)
    assert sorted(finished.finished) == sorted([done.id, dead.id])
    assert finished.woken == []

    what = "state, attempt, snoozes, result, jsonb_array_length(errors), finished_at IS NOT NULL, worker_id"
    assert cols(db, app, done.id, what) == ("succeeded", 1, 0, {"ok": [1, 2]}, 0, True, None)
    assert cols(db, app, retried.id, what) == ("scheduled", 1, 0, None, 1, False, None)
    assert cols(db, app, retried.id, "run_at > now() + interval '50 minutes', errors -> 0 ->> 'type'") == (
        True,
        "ValueError",
    )
    assert cols(db, app, dead.id, what) == ("dead", 1, 0, None, 1, True, None)
    assert cols(db, app, snoozed.id, what) == ("scheduled", 0, 1, None, 0, False, None)  # the attempt refunded


def test_finish_with_a_stale_lease_changes_nothing(app: TaskPG, db: psycopg.Connection) -> None:
    job = add(app.store)
    first = claim_one(app.store, job, "w-old")
    app.store.finish([Outcome(first, JobState.AVAILABLE, refund=1)])
    second = claim_one(app.store, job, "w-new")

    late = app.store.finish([Outcome(first, JobState.SUCCEEDED, result="1")])  # the first attempt's lease
    assert late == Finished([], [], [])
    forged = dataclasses.replace(second, lease=str(uuid.uuid4()))
    assert app.store.finish([Outcome(forged, JobState.DEAD)]) == Finished([], [], [])
    assert cols(db, app, job.id, "state, worker_id, lease::text, result") == ("running", "w-new", second.lease, None)

    assert app.store.finish([Outcome(second, JobState.SUCCEEDED, result="1")]).finished == [job.id]
    assert app.store.finish([Outcome(second, JobState.SUCCEEDED, result="2")]) == Finished([], [], [])  # not running


def test_promote_due_makes_due_jobs_available(app: TaskPG, db: psycopg.Connection) -> None:
    assert app.store.promote_due() == Promoted(0, None)
    soon, later = add(app.store, countdown=3600), add(app.store, countdown=7200)
    idle = app.store.promote_due()
    assert idle.count == 0
    assert idle.next_due_in is not None and 0 < idle.next_due_in <= 3600

    db.execute(f"""UPDATE "{app.schema}".jobs SET run_at = now() - interval '1 s' WHERE id = %s""", (soon.id,))
    promoted = app.store.promote_due()
    assert promoted.count == 1
    assert promoted.next_due_in is not None and 3600 < promoted.next_due_in <= 7200  # the later job
    assert cols(db, app, soon.id, "state") == ("available",)
    assert cols(db, app, later.id, "state") == ("scheduled",)

    db.execute(f"""UPDATE "{app.schema}".jobs SET run_at = now() - interval '1 s' WHERE id = %s""", (later.id,))
    assert app.store.promote_due() == Promoted(1, None)


def test_promote_due_honours_its_limit_and_wakes_the_queue(
    app: TaskPG, db: psycopg.Connection, listener: Store
) -> None:
    for _ in range(3):
        add(app.store, queue="staged", countdown=3600)
    db.execute(f"""UPDATE "{app.schema}".jobs SET run_at = now() - interval '1 s'""")
    listener.listen_for_jobs()
    assert app.store.promote_due(limit=2).count == 2
    assert app.store.promote_due(limit=2) == Promoted(1, None)
    app.store.notify_queues(["sentinel"])
    assert payloads_until(listener, "sentinel") == ["staged", "staged", "sentinel"]  # one per promoting statement


# -- workers and rescue --------------------------------------------------------------------------


def test_heartbeat_and_list_workers(app: TaskPG, db: psycopg.Connection) -> None:
    info = WorkerInfo("w1", "host-a", 4242, ["a", "b"], 8)
    app.store.heartbeat(info)
    (row,) = app.store.list_workers(alive_within=60)
    assert (row.id, row.hostname, row.pid, row.queues, row.concurrency, row.alive) == (
        "w1",
        "host-a",
        4242,
        ["a", "b"],
        8,
        True,
    )

    db.execute(f"""UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '1 hour'""")
    (silent,) = app.store.list_workers(alive_within=60)
    assert not silent.alive
    app.store.heartbeat(info)
    (again,) = app.store.list_workers(alive_within=60)
    assert again.alive and again.started_at == row.started_at and again.heartbeat_at > silent.heartbeat_at


def silent_worker(app: TaskPG, db: psycopg.Connection, worker_id: str, running: Sequence[str]) -> None:
    """A worker row that recorded ``running`` as started, then stopped heartbeating an hour ago."""
    app.store.heartbeat(WorkerInfo(worker_id, "host", 1, ["q"], 1))
    assert app.store.record_running(worker_id, running)
    db.execute(
        f"""UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '1 hour' WHERE id = %s""", (worker_id,)
    )


def test_rescue_gives_a_job_that_never_started_its_attempt_back(app: TaskPG, db: psycopg.Connection) -> None:
    lost, kept = add(app.store, queue="lost"), add(app.store, queue="kept")
    claim_one(app.store, lost, "w-gone")  # claimed by a worker that never heartbeats, and never started it
    app.store.heartbeat(WorkerInfo("w-live", "host", 1, ["kept"], 1))
    claim_one(app.store, kept, "w-live")

    assert app.store.rescue(after=30) == Rescued(1, [], started=0)
    assert cols(db, app, lost.id, "state, attempt, worker_id, finished_at, errors, rescues, crashes") == (
        "scheduled",
        0,  # the claim's attempt is given back
        None,
        None,
        [],  # nothing recorded against it: it never ran
        1,
        0,
    )
    # It comes back within RESCUE_SPREAD seconds, not all at once with the rest of its batch.
    assert cols(db, app, lost.id, f"run_at BETWEEN now() AND now() + interval '{RESCUE_SPREAD} s'") == (True,)
    assert cols(db, app, kept.id, "state, worker_id") == ("running", "w-live")
    db.execute(f"""UPDATE "{app.schema}".jobs SET state = 'available' WHERE id = %s""", (lost.id,))
    (again,) = app.store.claim(["lost"], 1, "w-next")
    assert again.id == lost.id and again.suspect and again.attempt == 1  # its next start is written first

    db.execute(f"""UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '1 hour'""")
    assert app.store.rescue(after=30).count == 2  # w-live went silent too (and w-next never heartbeat)


def test_rescue_charges_a_started_job_and_counts_the_crash(app: TaskPG, db: psycopg.Connection) -> None:
    started, prefetched = add(app.store), add(app.store)
    app.store.claim(["q"], 10, "w-gone")
    silent_worker(app, db, "w-gone", [started.id])

    assert app.store.rescue(after=30) == Rescued(2, [], started=1)
    assert cols(db, app, started.id, "state, attempt, rescues, crashes") == ("scheduled", 1, 1, 1)
    assert cols(db, app, prefetched.id, "state, attempt, rescues, crashes, errors") == ("scheduled", 0, 1, 0, [])
    (errors,) = cols(db, app, started.id, "errors")
    error = errors[0]
    assert (error["type"], error["module"], error["attempt"], error["worker"], error["crashes"]) == (
        "WorkerLost",
        "taskpg.exceptions",
        1,
        "w-gone",
        1,
    )
    assert "heartbeat" in error["message"]
    assert cols(db, app, started.id, "(errors -> 0 ->> 'at')::timestamptz <= now()") == (True,)


def test_rescue_kills_a_started_job_on_its_last_attempt(app: TaskPG, db: psycopg.Connection) -> None:
    last = add(app.store, max_attempts=1)
    claim_one(app.store, last, "w-gone")
    silent_worker(app, db, "w-gone", [last.id])
    assert app.store.rescue(after=30) == Rescued(1, [last.id], started=1)
    assert cols(db, app, last.id, "state, finished_at IS NOT NULL, errors -> -1 ->> 'type'") == (
        "dead",
        True,
        "WorkerLost",
    )
    assert app.store.rescue(after=30) == Rescued(0, [])


def test_a_job_whose_worker_died_while_running_it_three_times_goes_dead(app: TaskPG, db: psycopg.Connection) -> None:
    killer = add(app.store, max_attempts=10)  # attempts to spare: the crashes end it
    for crash in range(1, MAX_CRASHES + 1):
        db.execute(f"""UPDATE "{app.schema}".jobs SET state = 'available' WHERE id = %s""", (killer.id,))
        claim_one(app.store, killer, f"w-{crash}")
        silent_worker(app, db, f"w-{crash}", [killer.id])
        rescued = app.store.rescue(after=30)
        assert rescued.dead == ([killer.id] if crash == MAX_CRASHES else [])
    state, attempt, crashes, errors = cols(db, app, killer.id, "state, attempt, crashes, errors")
    assert (state, attempt, crashes) == ("dead", 3, 3)
    assert [e["crashes"] for e in errors] == [1, 2, 3]
    assert "the worker died while running it 3 times" in errors[-1]["message"]
    assert "heartbeat" in errors[0]["message"]


def test_record_running_needs_the_worker_row(app: TaskPG, db: psycopg.Connection) -> None:
    job = add(app.store)
    assert not app.store.record_running("w-unregistered", [job.id])
    app.store.heartbeat(WorkerInfo("w1", "host", 1, ["q"], 1))
    assert app.store.record_running("w1", [job.id])
    assert one(db, f'SELECT running::text[] FROM "{app.schema}".workers') == ([job.id],)


def test_release_unknown_returns_old_claims_the_worker_does_not_hold(app: TaskPG, db: psycopg.Connection) -> None:
    held, unknown, fresh = add(app.store), add(app.store), add(app.store, queue="fresh")
    app.store.claim(["q"], 10, "w1")
    db.execute(f"""UPDATE "{app.schema}".jobs SET started_at = now() - interval '1 minute'""")
    claim_one(app.store, fresh, "w1")  # claimed just now: its reply may still be on its way

    assert app.store.release_unknown("w1", [held.id]) == 1
    assert cols(db, app, unknown.id, "state, worker_id, attempt") == ("available", None, 1)
    assert cols(db, app, held.id, "state") == ("running",)
    assert cols(db, app, fresh.id, "state") == ("running",)
    assert app.store.release_unknown("w2", []) == 0


def test_delete_worker_and_stale_workers(app: TaskPG, db: psycopg.Connection) -> None:
    for name in ("w-old", "w-new", "w-leaving"):
        app.store.heartbeat(WorkerInfo(name, "host", 1, ["q"], 1))
    db.execute(f"""UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '1 hour' WHERE id = 'w-old'""")
    app.store.delete_stale_workers(after=60)
    assert {w.id for w in app.store.list_workers(60)} == {"w-new", "w-leaving"}
    app.store.delete_worker("w-leaving")
    assert [w.id for w in app.store.list_workers(60)] == ["w-new"]


# -- rate limits ---------------------------------------------------------------------------------


def test_rate_reserve_spaces_starts_and_keeps_one_row_per_key(app: TaskPG, db: psycopg.Connection) -> None:
    key = f"{app.schema}:rate:a"
    slots = [app.store.rate_reserve(key, 10.0) for _ in range(3)]
    assert slots[0].wait == 0.0  # the first start is now
    assert 9.9 < slots[1].wait <= 10.0 and 19.9 < slots[2].wait <= 20.0  # then one every 10 s, reserved in turn
    assert [slot.at - slots[0].at for slot in slots] == pytest.approx([0.0, 10.0, 20.0], abs=1e-5)  # absolute starts
    assert app.store.rate_reserve(f"{app.schema}:rate:b", 10.0).wait == 0.0  # each key on its own
    rows = db.execute(f'SELECT key, granted FROM "{app.schema}".rate_limits ORDER BY key').fetchall()
    assert rows == [(key, 3), (f"{app.schema}:rate:b", 1)]  # constant state per key, whatever the rate


def test_rate_reserve_after_a_quiet_while_starts_now(app: TaskPG, db: psycopg.Connection) -> None:
    key = f"{app.schema}:rate"
    app.store.rate_reserve(key, 1.0)
    db.execute(f"UPDATE \"{app.schema}\".rate_limits SET tat = now() - interval '1 minute'")
    assert app.store.rate_reserve(key, 1.0).wait == 0.0
    assert app.store.rate_reserve(key, 1.0).wait > 0.9  # no credit for the quiet minute: no burst


# -- beat ----------------------------------------------------------------------------------------


def test_try_lead_lets_one_session_lead(app: TaskPG, pg_dsn: str) -> None:
    key = f"taskpg:{app.schema}:beat"
    with psycopg.connect(pg_dsn, autocommit=True) as other:
        second = app.store.on(other)
        with psycopg.connect(pg_dsn, autocommit=True) as first_conn:
            first = app.store.on(first_conn)
            assert first.try_lead(key) is True
            assert second.try_lead(key) is False
            assert first.try_lead(key) is True  # the leader keeps it
        # The leader's session ended: the lock is freed once the server has closed that session.
        deadline = time.monotonic() + 10
        while not second.try_lead(key):
            assert time.monotonic() < deadline, "the lock was not freed when the leader disconnected"
            time.sleep(0.05)


def test_ticks_are_claimed_once_and_remember_their_job(app: TaskPG, db: psycopg.Connection) -> None:
    seen = dt.datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    fired = dt.datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    job_id = new_job_id()
    assert app.store.last_ticks(["hourly"]) == []
    assert app.store.claim_tick("hourly", seen, None) is True  # first sight: a mark, no job
    assert app.store.claim_tick("hourly", seen, None) is False
    assert app.store.last_ticks(["hourly"]) == [TickState("hourly", seen, None)]

    assert app.store.claim_tick("hourly", fired, None) is True
    assert app.store.claim_tick("hourly", fired, job_id) is False  # another beat lost the race
    app.store.set_tick_job("hourly", fired, job_id)
    assert app.store.last_ticks(["hourly", "never"]) == [TickState("hourly", fired, fired)]
    rows = db.execute(f'SELECT tick, job_id::text FROM "{app.schema}".periodic_ticks ORDER BY tick').fetchall()
    assert rows == [(seen, None), (fired, job_id)]


# -- retention -----------------------------------------------------------------------------------


def test_prune_by_age(app: TaskPG, db: psycopg.Connection) -> None:
    old = [add(app.store, queue="a").id for _ in range(3)]
    old_b = add(app.store, queue="b").id
    fresh = add(app.store, queue="a").id
    old_dead = add(app.store, queue="a").id
    set_finished(db, app, [*old, old_b], JobState.SUCCEEDED, 7200)
    set_finished(db, app, [fresh], JobState.SUCCEEDED, 0)
    set_finished(db, app, [old_dead], JobState.DEAD, 7200)

    # Every queue but "b" (which has a rule of its own), in batches of two.
    assert app.store.prune_by_age(JobState.SUCCEEDED, 3600, None, ["b"], batch=2) == 2
    assert app.store.prune_by_age(JobState.SUCCEEDED, 3600, None, ["b"], batch=2) == 1
    assert app.store.prune_by_age(JobState.SUCCEEDED, 3600, None, ["b"], batch=2) == 0
    assert ids_in(db, app) == {old_b, fresh, old_dead}
    assert app.store.prune_by_age(JobState.SUCCEEDED, 3600, "b", [], batch=100) == 1
    assert app.store.prune_by_age(JobState.DEAD, 3600, None, [], batch=100) == 1
    assert ids_in(db, app) == {fresh}


def test_prune_by_count_keeps_the_newest_per_queue(app: TaskPG, db: psycopg.Connection) -> None:
    in_a = [add(app.store, queue="a").id for _ in range(4)]
    in_b = add(app.store, queue="b").id
    for age, job_id in enumerate(reversed(in_a)):  # in_a[-1] is the newest
        set_finished(db, app, [job_id], JobState.SUCCEEDED, 100 * age)
    set_finished(db, app, [in_b], JobState.SUCCEEDED, 1000)
    available = add(app.store, queue="a").id

    assert app.store.prune_by_count(JobState.SUCCEEDED, 2, None, [], batch=100) == 2
    assert ids_in(db, app) == {in_a[2], in_a[3], in_b, available}
    assert app.store.prune_by_count(JobState.SUCCEEDED, 0, "a", [], batch=100) == 2
    assert app.store.prune_by_count(JobState.DEAD, 0, None, [], batch=100) == 0
    assert ids_in(db, app) == {in_b, available}


def test_prune_ticks_keeps_the_newest_tick_of_each_schedule(app: TaskPG, db: psycopg.Connection) -> None:
    ticks = [dt.datetime(2026, 1, 1, hour, tzinfo=UTC) for hour in range(3)]
    for tick in ticks:
        app.store.claim_tick("s", tick, None)
    app.store.claim_tick("u", ticks[0], None)
    db.execute(f"""UPDATE "{app.schema}".periodic_ticks SET created_at = now() - interval '2 hours'""")
    app.store.claim_tick("fresh", ticks[0], None)
    app.store.claim_tick("fresh", ticks[1], None)

    app.store.prune_ticks(age=3600)
    rows = db.execute(f'SELECT schedule, tick FROM "{app.schema}".periodic_ticks ORDER BY schedule, tick').fetchall()
    assert rows == [("fresh", ticks[0]), ("fresh", ticks[1]), ("s", ticks[2]), ("u", ticks[0])]


def test_prune_limits_drops_what_ran_out(app: TaskPG, db: psycopg.Connection) -> None:
    s = app.schema
    app.store.throttle_admit("tests.t", "now", Rate(1, WEEK), 0)
    db.execute(
        f'INSERT INTO "{s}".throttle_windows (task, key, window_start, window_end) '
        "VALUES ('tests.t', 'old', now() - interval '3 days', now() - interval '2 days')"
    )
    app.store.take_unique_lock("run-out", new_job_id(), 0)
    app.store.take_unique_lock("held", new_job_id(), 3600)
    app.store.rate_reserve(f"{s}:live", 3600)
    db.execute(f"INSERT INTO \"{s}\".rate_limits (key, tat) VALUES ('expired', now() - interval '2 days')")

    app.store.prune_limits()
    assert db.execute(f'SELECT key FROM "{s}".throttle_windows').fetchall() == [("now",)]
    assert db.execute(f'SELECT key FROM "{s}".unique_locks').fetchall() == [("held",)]
    assert db.execute(f'SELECT key FROM "{s}".rate_limits').fetchall() == [(f"{s}:live",)]


def test_autovacuum_active_follows_the_server_and_the_table(app: TaskPG, db: psycopg.Connection) -> None:
    # The shared server runs with autovacuum off, the embedded one (tox's embedded env) with it on.
    server_on = one(db, "SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool")
    assert app.store.autovacuum_active() is server_on[0]
    db.execute(f'ALTER TABLE "{app.schema}".jobs SET (autovacuum_enabled = false)')
    assert app.store.autovacuum_active() is False


def test_vacuum_jobs_runs(app: TaskPG, db: psycopg.Connection) -> None:
    add(app.store)
    app.store.vacuum_jobs()
    query = "SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'"
    vacuums, analyzes = one(db, query, (app.schema,))
    assert vacuums >= 1 and analyzes >= 1


# -- operations ----------------------------------------------------------------------------------


def test_job_counts_by_queue_and_state(app: TaskPG) -> None:
    assert app.store.job_counts() == {}
    add(app.store, queue="a")
    add(app.store, queue="a")
    add(app.store, queue="a", countdown=3600)
    add(app.store, queue="b")
    assert app.store.job_counts() == {"a": {"available": 2, "scheduled": 1}, "b": {"available": 1}}


def test_limit_counts_shows_throttled_calls_and_snoozes(app: TaskPG) -> None:
    rate = Rate(1, WEEK)
    app.store.throttle_admit("tests.throttled", "k", rate, 0)
    app.store.throttle_rejected("tests.throttled", "k", rate)
    app.store.throttle_rejected("tests.throttled", "k", rate)
    job = add(app.store, task="tests.snoozy")
    claimed = claim_one(app.store, job)
    app.store.finish([Outcome(claimed, JobState.SCHEDULED, delay=60, refund=1, snoozed=1)])
    assert app.store.limit_counts() == {
        "tests.snoozy": LimitCounts(throttled=0, snoozed=1),
        "tests.throttled": LimitCounts(throttled=2, snoozed=0),
    }


def kill(app: TaskPG, job: NewJob, message: str) -> None:
    """Run one attempt of ``job`` that fails for good."""
    claimed = claim_one(app.store, job)
    error = failures.record("ValueError", message, claimed.attempt, "w1")
    assert app.store.finish([Outcome(claimed, JobState.DEAD, error=error)]).finished == [job.id]


def test_dead_list_shows_dead_jobs_newest_first(app: TaskPG, db: psycopg.Connection) -> None:
    older, newer = add(app.store, task="tests.a", queue="x"), add(app.store, task="tests.b", queue="y")
    add(app.store, queue="z")  # not dead
    kill(app, older, "first")
    kill(app, newer, "second")
    db.execute(f"""UPDATE "{app.schema}".jobs SET finished_at = now() - interval '1 hour' WHERE id = %s""", (older.id,))

    listed = app.store.dead_list(None, None, 10)
    assert [d.id for d in listed] == [newer.id, older.id]
    first = listed[0]
    assert isinstance(first, DeadJob)
    assert (first.task, first.queue, first.attempts, first.error_type, first.error_message) == (
        "tests.b",
        "y",
        1,
        "ValueError",
        "second",
    )
    assert first.died_at is not None
    assert [d.id for d in app.store.dead_list("x", None, 10)] == [older.id]
    assert [d.id for d in app.store.dead_list(None, "tests.b", 10)] == [newer.id]
    assert [d.id for d in app.store.dead_list(None, None, 1)] == [newer.id]


def test_dead_retry_gives_dead_jobs_fresh_attempts(app: TaskPG, db: psycopg.Connection, listener: Store) -> None:
    by_id, by_queue, left = add(app.store, queue="x"), add(app.store, queue="y"), add(app.store, queue="z")
    for job in (by_id, by_queue, left):
        kill(app, job, "boom")
    listener.listen_for_jobs()

    assert app.store.dead_retry([by_id.id], None, None) == 1
    assert app.store.dead_retry(None, "y", None) == 1
    assert app.store.dead_retry(None, "y", None) == 0  # nothing dead left there
    assert app.store.dead_retry(None, None, "tests.other") == 0
    what = "state, attempt, finished_at, worker_id, jsonb_array_length(errors)"
    assert cols(db, app, by_id.id, what) == ("available", 0, None, None, 1)  # the error history kept
    assert cols(db, app, by_queue.id, what) == ("available", 0, None, None, 1)
    assert cols(db, app, left.id, "state") == ("dead",)
    app.store.notify_queues(["sentinel"])
    assert payloads_until(listener, "sentinel") == ["x", "y", "sentinel"]


def test_dead_purge_deletes_old_dead_jobs(app: TaskPG, db: psycopg.Connection) -> None:
    old_dead, fresh_dead, old_done = add(app.store, queue="x"), add(app.store, queue="x"), add(app.store, queue="x")
    old_elsewhere = add(app.store, queue="y")
    set_finished(db, app, [old_dead.id, old_elsewhere.id], JobState.DEAD, 7200)
    set_finished(db, app, [fresh_dead.id], JobState.DEAD, 0)
    set_finished(db, app, [old_done.id], JobState.SUCCEEDED, 7200)

    assert app.store.dead_purge(3600, "x", None) == 1
    assert ids_in(db, app) == {fresh_dead.id, old_done.id, old_elsewhere.id}
    assert app.store.dead_purge(3600, None, "tests.other") == 0
    assert app.store.dead_purge(3600, None, None) == 1
    assert ids_in(db, app) == {fresh_dead.id, old_done.id}


def test_copy_to_queue_copies_a_job_with_its_errors(app: TaskPG, db: psycopg.Connection) -> None:
    job = add(app.store, task="tests.copied", queue="work", args='["a"]', kwargs='{"k": 1}', priority=2)
    kill(app, job, "boom")
    new_id = new_job_id()
    app.store.copy_to_queue(job.id, new_id, "graveyard")
    what = "task, queue, args, kwargs, priority, max_attempts, state, attempt, errors -> 0 ->> 'message'"
    assert cols(db, app, new_id, what) == ("tests.copied", "graveyard", ["a"], {"k": 1}, 2, 3, "available", 0, "boom")
    assert cols(db, app, job.id, "state, queue") == ("dead", "work")  # the original stays


# -- schema --------------------------------------------------------------------------------------


def test_schema_revision_is_the_one_this_code_needs(app: TaskPG) -> None:
    assert app.store.schema_revision() == SCHEMA_REVISION
    app.store.check_schema()


def test_check_schema_refuses_an_unmigrated_schema(pg_dsn: str, schema: str) -> None:
    connections = Connections(pg_dsn)
    store = Store(connections, schema)
    try:
        assert store.schema_revision() is None
        with pytest.raises(SchemaNotReady, match="is not migrated"):
            store.check_schema()
        with pytest.raises(SchemaNotReady):  # every statement checks first
            store.insert_job(new_job(), notify=False)
    finally:
        connections.close()


def test_check_schema_refuses_an_older_revision(pg_dsn: str, schema: str) -> None:
    migrate.upgrade(pg_dsn, schema, "0002")
    connections = Connections(pg_dsn)
    try:
        with pytest.raises(SchemaNotReady, match="is at revision 0002"):
            Store(connections, schema).check_schema()
    finally:
        connections.close()


# -- a store bound to the caller's transaction ---------------------------------------------------


@pytest.fixture
def caller_conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """A connection in the caller's hands: not autocommit, so statements wait for its commit."""
    with psycopg.connect(pg_dsn) as conn:
        yield conn


def test_a_job_in_the_callers_transaction_exists_after_commit(
    app: TaskPG, db: psycopg.Connection, caller_conn: psycopg.Connection
) -> None:
    job = new_job()
    assert app.store.on(caller_conn).insert_job(job, notify=True).inserted
    assert ids_in(db, app) == set()  # not committed yet
    caller_conn.commit()
    assert ids_in(db, app) == {job.id}


def test_a_job_in_the_callers_transaction_vanishes_on_rollback(
    app: TaskPG, db: psycopg.Connection, caller_conn: psycopg.Connection
) -> None:
    bound = app.store.on(caller_conn)
    job = new_job()
    assert bound.insert_job(job, notify=True).inserted
    assert bound.get_job(job.id) is not None  # the caller's transaction sees its own job
    caller_conn.rollback()
    assert ids_in(db, app) == set()
    assert bound.get_job(job.id) is None


def test_a_store_transaction_in_the_callers_transaction_is_a_savepoint(
    app: TaskPG, db: psycopg.Connection, caller_conn: psycopg.Connection
) -> None:
    bound = app.store.on(caller_conn)
    undone, kept = new_job(), new_job()
    with pytest.raises(RuntimeError), bound.transaction() as tx:
        tx.insert_job(undone, notify=False)
        raise RuntimeError("roll the block back")
    with bound.transaction() as tx:
        tx.insert_job(kept, notify=False)
    assert ids_in(db, app) == set()  # the block did not commit the caller's transaction
    caller_conn.commit()
    assert ids_in(db, app) == {kept.id}
