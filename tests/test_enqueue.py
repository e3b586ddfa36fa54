"""Enqueue into real Postgres: direct, delayed, bulk COPY, bad arguments, NOTIFY per transaction."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import ConfigurationError, SerializationError, TaskPG

if TYPE_CHECKING:
    from collections.abc import Iterator


def job_row(db: psycopg.Connection, schema: str, job_id: str) -> dict[str, Any]:
    cur = db.execute(f'SELECT * FROM "{schema}".jobs WHERE id = %s', (job_id,))
    row = cur.fetchone()
    assert row is not None, f"job {job_id} not found"
    return dict(zip([c.name for c in cur.description or ()], row, strict=True))


def count_jobs(db: psycopg.Connection, schema: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone()
    assert row is not None
    return int(row[0])


def test_delay_writes_one_available_job(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(queue="emails", priority=3, max_retries=4)
    def send(user_id: int, subject: str = "") -> None:
        return None

    handle = send.delay(7, subject="hi")
    row = job_row(db, app.schema, handle.id)
    assert row["task"] == send.name
    assert (row["queue"], row["priority"], row["state"], row["attempt"], row["max_attempts"]) == (
        "emails",
        3,
        "available",
        0,
        5,
    )
    assert row["args"] == [7] and row["kwargs"] == {"subject": "hi"}
    assert handle.status == "PENDING"


def test_countdown_and_eta_schedule_the_job(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task
    def later() -> None:
        return None

    soon = later.apply_async(countdown=60)
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    at_eta = later.apply_async(eta=eta)
    past = later.apply_async(eta=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
    soon_row, eta_row = job_row(db, app.schema, soon.id), job_row(db, app.schema, at_eta.id)
    assert soon_row["state"] == "scheduled"
    assert 50 < (soon_row["run_at"] - soon_row["created_at"]).total_seconds() < 70
    assert eta_row["state"] == "scheduled" and eta_row["run_at"] == eta
    assert job_row(db, app.schema, past.id)["state"] == "available"
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        later.apply_async(eta=dt.datetime.now())
    with pytest.raises(ConfigurationError, match="not both"):
        later.apply_async(countdown=1, eta=eta)


def test_queue_and_priority_overrides(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(queue="a")
    def work() -> None:
        return None

    handle = work.apply_async(queue="b", priority=-4)
    row = job_row(db, app.schema, handle.id)
    assert (row["queue"], row["priority"]) == ("b", -4)
    with pytest.raises(ConfigurationError):
        work.apply_async(queue="not a queue")


def test_non_json_argument_names_task_and_argument_and_writes_nothing(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(name="billing.charge")
    def charge(amount: object, note: object = None) -> None:
        return None

    with pytest.raises(SerializationError, match=r"billing.charge.*positional argument 0 \(set\)"):
        charge.delay({1, 2})
    with pytest.raises(SerializationError, match=r"keyword argument 'note' \(datetime\)"):
        charge.delay(1, note=dt.datetime.now())
    with pytest.raises(SerializationError, match=r"NaN|Out of range"):
        charge.delay(float("nan"))
    assert count_jobs(db, app.schema) == 0


def test_payload_size_limit(pg_dsn: str, migrated_schema: str, db: psycopg.Connection) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=1000)

    @app.task
    def big(blob: str) -> None:
        return None

    with pytest.raises(SerializationError, match="over the limit of 1000 bytes"):
        big.delay("x" * 2000)
    assert count_jobs(db, migrated_schema) == 0
    app.close()


def test_delay_many_copies_100k_jobs(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task
    def item(n: int) -> None:
        return None

    ids = item.delay_many((n,) for n in range(100_000))
    assert len(ids) == len(set(ids)) == 100_000
    row = db.execute(
        f"SELECT count(*), count(DISTINCT id), min((args->>0)::int), max((args->>0)::int) "
        f'FROM "{app.schema}".jobs WHERE state = %s',
        ("available",),
    ).fetchone()
    assert row == (100_000, 100_000, 0, 99_999)
    assert job_row(db, app.schema, ids[123])["args"] == [123]


def test_delay_many_accepts_kwargs_and_options(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task
    def greet(name: str = "", loud: bool = False) -> None:
        return None

    ids = greet.delay_many([{"name": "ana"}, ("bo",), {"name": "cy", "loud": True}], countdown=30, queue="slow")
    rows = [job_row(db, app.schema, i) for i in ids]
    assert [r["kwargs"] for r in rows] == [{"name": "ana"}, {}, {"name": "cy", "loud": True}]
    assert rows[1]["args"] == ["bo"]
    assert {r["state"] for r in rows} == {"scheduled"} and {r["queue"] for r in rows} == {"slow"}


def test_delay_many_with_a_bad_item_writes_nothing(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task
    def item(n: object) -> None:
        return None

    with pytest.raises(SerializationError, match=r"item 2: .*positional argument 0"):
        item.delay_many([(1,), (2,), (object(),), (4,)])
    with pytest.raises(ConfigurationError, match="tuples or keyword dicts"):
        item.delay_many([(1,), 5])  # type: ignore[list-item]
    assert count_jobs(db, app.schema) == 0


def test_delay_many_stores_arguments_exactly_and_returns_ids_in_order(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(priority=2, max_retries=5)
    def note(*parts: object, **named: object) -> None:
        return None

    tricky = ["tab\there", "new\nline", "back\\slash", 'quo"te', "\\N", "ünï 😀", "\u2028", {"k\\": [1.5, None]}]
    calls: list[Any] = [(text,) for text in tricky] + [{"a": "x\\y"}, (), [1, 2]]
    ids = note.delay_many(calls)
    columns = "id::text, args, kwargs, priority, max_attempts, state, run_at <= now()"
    cur = db.execute(f'SELECT {columns} FROM "{app.schema}".jobs ORDER BY id')
    rows = cur.fetchall()
    assert [r[0] for r in rows] == ids  # the returned ids, sorting in call order (claim order within a batch)
    assert [(r[1], r[2]) for r in rows] == [([t], {}) for t in tricky] + [([], {"a": "x\\y"}), ([], {}), ([1, 2], {})]
    assert {(r[3], r[4], r[5], r[6]) for r in rows} == {(2, 6, "available", True)}
    assert {uuid.UUID(i).version for i in ids} == {7}


def test_delay_many_bad_item_late_in_a_big_batch_names_it_and_writes_nothing(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=1000)

    @app.task
    def item(n: object) -> None:
        return None

    def calls(bad: object) -> Iterator[tuple[object, ...]]:
        yield from ((n,) for n in range(5000))  # several COPY chunks have left before the bad item
        yield (bad,)

    with pytest.raises(SerializationError, match=r"delay_many item 5000: task .*positional argument 0 \(set\)"):
        item.delay_many(calls({1}))
    with pytest.raises(SerializationError, match=r"item 5000: .*over the limit of 1000 bytes"):
        item.delay_many(calls("x" * 2000))
    with pytest.raises(SerializationError, match=r"item 5000: .*NUL"):
        item.delay_many(calls("a\x00b"))
    with pytest.raises(SerializationError, match=r"item 1: .*keyword names must be strings"):
        item.delay_many([{"n": 1}, {1: 2}])
    assert count_jobs(db, migrated_schema) == 0
    assert len(item.delay_many([("x" * 990,), ("é" * 400,)])) == 2  # near the limit: checked exactly, in bytes
    app.close()


def test_delay_many_run_at_in_a_caller_transaction_is_the_enqueue_time(app: TaskPG, pg_dsn: str) -> None:
    @app.task
    def item(n: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:
        started = conn.execute("SELECT now()").fetchone()
        time.sleep(0.05)
        ids = item.delay_many([(1,), (2,)], connection=conn)
        row = conn.execute(f'SELECT min(run_at), max(state) FROM "{app.schema}".jobs WHERE id = ANY(%s)', (ids,))
        run_at, state = row.fetchone() or (None, None)
    assert started is not None and run_at is not None and state == "available"
    assert run_at - started[0] >= dt.timedelta(seconds=0.04)  # not the transaction's start, as now() would be


def test_delay_many_eta_in_the_past_is_available(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task
    def item(n: int) -> None:
        return None

    past = dt.datetime(2020, 1, 2, 3, 4, 5, 600_000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ids = item.delay_many([(1,)], eta=past)
    row = job_row(db, app.schema, ids[0])
    assert (row["state"], row["run_at"]) == ("available", past)
    with pytest.raises(ConfigurationError, match="countdown"):
        item.delay_many([(1,)], countdown=-1)
    with pytest.raises(ConfigurationError, match="priority"):
        item.delay_many([(1,)], priority=10**6)
    assert item.delay_many([]) == []
    assert count_jobs(db, app.schema) == 1


def collect_notifications(
    dsn: str, channel: str, ready: threading.Event, stop: threading.Event, seen: list[str]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'LISTEN "{channel}"')
        ready.set()
        while not stop.is_set():
            for note in conn.notifies(timeout=0.2):
                seen.append(note.payload)


def test_notify_once_per_transaction_not_per_row(app: TaskPG, pg_dsn: str) -> None:
    @app.task(queue="bulk")
    def item(n: int) -> None:
        return None

    seen: list[str] = []
    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(
        target=collect_notifications, args=(pg_dsn, app.store.q.jobs_channel, ready, stop, seen)
    )
    listener.start()
    ready.wait(5)
    item.delay_many((n,) for n in range(1000))
    with psycopg.connect(pg_dsn) as conn:  # one caller transaction, 50 single enqueues
        for n in range(50):
            item.apply_async(args=(n,), connection=conn)
    item.apply_async(args=(1,), countdown=30)  # scheduled: wakes nobody
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for any extra notification to arrive
    stop.set()
    listener.join(5)
    assert seen == ["bulk", "bulk"]


def test_job_ids_are_uuid7_and_never_shared_with_a_forked_child() -> None:
    import os
    import uuid

    from taskpg.job import new_job_id

    ids = [new_job_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    prefixes = [i[:13] for i in ids]  # the millisecond timestamp: ids are time-ordered
    assert prefixes == sorted(prefixes)
    assert {uuid.UUID(i).version for i in ids} == {7}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(write, new_job_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    assert child_id[19:] != new_job_id()[19:]  # different random bits, not only a later timestamp
