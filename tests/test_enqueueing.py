"""docs/enqueueing.md: direct, delayed and bulk enqueues, the caller's transaction, NOTIFY and notify_debounce."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, select
from sqlalchemy.orm import Session
from support.example_runner import run_example
from support.rows import job_row

from taskpg import ConfigurationError, SerializationError, TaskPG
from taskpg.notifier import APPLICATION_NAME
from taskpg.sql import Queries

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

WINDOW = 0.05


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


# -- a job enqueued in the caller's transaction exists if and only if that transaction commits -----------


@pytest.fixture
def orders(pg_dsn: str, app: TaskPG):  # type: ignore[no-untyped-def]
    engine = create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    metadata = MetaData(schema=app.schema)
    table = Table("orders", metadata, Column("id", Integer, primary_key=True), Column("item", Text))
    metadata.create_all(engine)
    yield engine, table
    engine.dispose()


def jobs_for(db: psycopg.Connection, schema: str, job_id: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".jobs WHERE id = %s', (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("commit", [True, False])
def test_sqlalchemy_session(app: TaskPG, orders, db: psycopg.Connection, commit: bool) -> None:  # type: ignore[no-untyped-def]
    engine, table = orders

    @app.task
    def ship(order_id: int) -> None:
        return None

    with Session(engine) as session:
        session.execute(table.insert().values(id=1, item="book"))
        handle = ship.apply_async(args=(1,), session=session)
        # Not visible outside the transaction before it commits.
        assert jobs_for(db, app.schema, handle.id) == 0
        if commit:
            session.commit()
        else:
            session.rollback()
    assert jobs_for(db, app.schema, handle.id) == (1 if commit else 0)
    with engine.connect() as conn:
        assert len(conn.execute(select(table)).all()) == (1 if commit else 0)


@pytest.mark.parametrize("commit", [True, False])
def test_sqlalchemy_connection_and_bulk(app: TaskPG, orders, db: psycopg.Connection, commit: bool) -> None:  # type: ignore[no-untyped-def]
    engine, _ = orders

    @app.task
    def ship(order_id: int) -> None:
        return None

    with engine.connect() as conn:
        one = ship.apply_async(args=(1,), session=conn)
        many = ship.delay_many([(2,), (3,)], session=conn)
        if commit:
            conn.commit()
        else:
            conn.rollback()
    expected = 1 if commit else 0
    assert [jobs_for(db, app.schema, i) for i in [one.id, *many]] == [expected] * 3


@pytest.mark.parametrize("commit", [True, False])
def test_psycopg_connection(app: TaskPG, pg_dsn: str, db: psycopg.Connection, commit: bool) -> None:
    @app.task
    def ship(order_id: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:
        handle = ship.apply_async(args=(1,), connection=conn)
        ids = ship.delay_many([(2,), (3,)], connection=conn)
        if commit:
            conn.commit()
        else:
            conn.rollback()
    expected = 1 if commit else 0
    assert [jobs_for(db, app.schema, i) for i in [handle.id, *ids]] == [expected] * 3


@pytest.mark.parametrize("first", ["delay_many", "throttled", "unique"])
def test_first_statement_of_a_fresh_transaction_does_not_commit_on_its_own(
    app: TaskPG, pg_dsn: str, db: psycopg.Connection, first: str
) -> None:
    @app.task(throttle_key="{n}", throttle="5/h")
    def throttled(n: int) -> None:
        return None

    @app.task(unique_key="{n}")
    def unique(n: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:  # nothing run on it yet: no transaction open
        if first == "delay_many":
            unique.delay_many([(1,), (2,)], connection=conn)
        elif first == "throttled":
            throttled.apply_async(args=(1,), connection=conn)
        else:
            unique.apply_async(args=(1,), connection=conn)
        conn.rollback()
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".jobs').fetchone() == (0,)
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".throttle_windows').fetchone() == (0,)


def test_wrong_connection_types_are_refused(app: TaskPG) -> None:
    @app.task
    def ship() -> None:
        return None

    with pytest.raises(ConfigurationError, match="psycopg 3 connection"):
        ship.apply_async(connection=object())
    with pytest.raises(ConfigurationError, match=r"postgresql\+psycopg"):
        ship.apply_async(session=object())


# -- notify_debounce: enqueues on the app's connections NOTIFY after their commit, debounced per queue ------


@pytest.fixture
def debounced(pg_dsn: str, migrated_schema: str) -> Iterator[TaskPG]:
    application = TaskPG(pg_dsn, schema=migrated_schema, notify_debounce=WINDOW)
    yield application
    application.close()


class Notes:
    """A LISTENing connection in a thread: each notification with its arrival time and, when asked,
    how many available jobs the database held at that moment."""

    def __init__(self, dsn: str, schema: str, count_jobs: bool = False) -> None:
        self.dsn, self.schema, self.count_jobs = dsn, schema, count_jobs
        self.seen: list[tuple[float, str, int]] = []
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Notes:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        channel = Queries(self.schema).jobs_channel
        with psycopg.connect(self.dsn, autocommit=True) as conn, psycopg.connect(self.dsn, autocommit=True) as look:
            conn.execute(Queries.listen(channel))
            self.ready.set()
            while not self.stop.is_set():
                for note in conn.notifies(timeout=0.05):
                    self.seen.append((time.monotonic(), note.payload, self._available(look)))

    def _available(self, look: psycopg.Connection[Any]) -> int:
        if not self.count_jobs:
            return -1
        row = look.execute(f"SELECT count(*) FROM \"{self.schema}\".jobs WHERE state = 'available'").fetchone()
        return int(row[0]) if row else 0

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[float, str, int]]:
        """The notifications so far, once there are ``count`` of them (or after ``timeout``)."""
        return self.wait_until(lambda seen: len(seen) >= count, timeout)

    def wait_until(
        self, done: Callable[[list[tuple[float, str, int]]], bool], timeout: float = 5.0
    ) -> list[tuple[float, str, int]]:
        deadline = time.monotonic() + timeout
        while not done(list(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.005)
        return list(self.seen)


def noop_task(app: TaskPG, queue: str = "default") -> Any:
    @app.task(name=f"noop_{queue}", queue=queue)
    def noop(n: int = 0) -> int:
        return n

    return noop


def test_isolated_delay_is_announced_at_once_after_its_commit(pg_dsn: str, migrated_schema: str) -> None:
    slow = TaskPG(pg_dsn, schema=migrated_schema, notify_debounce=30)
    task = noop_task(slow)
    try:
        with Notes(pg_dsn, migrated_schema, count_jobs=True) as notes:
            task.delay(1)
            # Seen within wait_for's 5 s, not at the window's end 30 s later: the leading edge.
            [(_, queue, available)] = notes.wait_for(1)
            assert queue == "default" and available == 1  # sent after the commit: the job is there
    finally:
        slow.close()


def test_bulk_enqueues_are_announced_too(debounced: TaskPG, pg_dsn: str) -> None:
    task = noop_task(debounced)
    with Notes(pg_dsn, debounced.schema, count_jobs=True) as notes:
        task.delay_many([(2,), (3,)])
        assert [n[1:] for n in notes.wait_for(1)] == [("default", 2)]


def test_burst_sends_few_notifications_and_one_after_the_last_enqueue(debounced: TaskPG, pg_dsn: str) -> None:
    task = noop_task(debounced)
    clients, each = 8, 40

    def enqueue() -> None:
        for n in range(each):
            task.delay(n)

    with Notes(pg_dsn, debounced.schema, count_jobs=True) as notes:
        started = time.monotonic()
        threads = [threading.Thread(target=enqueue) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        # Some notification is seen after the last commit (the trailing edge: see the next test).
        seen = notes.wait_until(lambda seen: any(available == clients * each for _, _, available in seen))
    assert max(available for _, _, available in seen) == clients * each
    assert 1 <= len(seen) <= elapsed / WINDOW + 3 < clients * each


def test_leading_and_trailing_edge(pg_dsn: str, migrated_schema: str) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, notify_debounce=0.5)
    task = noop_task(app)
    try:
        with Notes(pg_dsn, migrated_schema, count_jobs=True) as notes:
            task.delay(1)  # quiet queue: notified at once
            first = notes.wait_for(1)
            task.delay(2)  # within the window: folded into one NOTIFY at its end
            task.delay(3)
            seen = notes.wait_for(2)
            time.sleep(0.7)  # and no more than that one
            assert notes.seen == seen
    finally:
        app.close()
    assert [(queue, available) for _, queue, available in seen] == [("default", 1), ("default", 3)]
    assert seen[1][0] - first[0][0] >= 0.4


def test_worker_wakes_promptly_with_debounced_notifications(debounced: TaskPG, run_worker: Callable[..., Any]) -> None:
    task = noop_task(debounced)
    with run_worker(debounced, poll_interval=60, concurrency=2):  # only a NOTIFY wakes it in time
        for n in range(3):
            assert task.delay(n).get(timeout=5) == n  # 5 s, against a 60 s poll
        handles = [task.delay(n) for n in range(20)]  # a burst: the trailing edge wakes it for the rest
        assert [h.get(timeout=5) for h in handles] == list(range(20))


@pytest.mark.parametrize("commit", [True, False])
def test_caller_transaction_still_notifies_only_on_commit(debounced: TaskPG, pg_dsn: str, commit: bool) -> None:
    task = noop_task(debounced)
    with Notes(pg_dsn, debounced.schema) as notes, psycopg.connect(pg_dsn) as conn:
        task.apply_async((1,), connection=conn)
        task.delay_many([(2,), (3,)], connection=conn)
        time.sleep(0.2)
        assert notes.seen == []  # nothing before the caller commits
        conn.commit() if commit else conn.rollback()
        if commit:
            notes.wait_for(1)
        time.sleep(0.3)  # room for any other notification to arrive
        assert [queue for _, queue, _ in notes.seen] == (["default"] if commit else [])
    assert debounced._notifier is None or debounced._notifier.sent == 0  # NOTIFY stayed in the transaction


def test_notifier_reconnects_after_losing_its_connection(debounced: TaskPG, pg_dsn: str, db: Any) -> None:
    task = noop_task(debounced)
    with Notes(pg_dsn, debounced.schema) as notes:
        task.delay(1)
        assert len(notes.wait_for(1)) == 1
        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()
        assert killed == (1,)
        time.sleep(2 * WINDOW)
        task.delay(2)
        assert len(notes.wait_for(2)) == 2


def test_close_sends_what_is_pending_and_stops_the_thread(debounced: TaskPG, pg_dsn: str) -> None:
    slow = TaskPG(pg_dsn, schema=debounced.schema, notify_debounce=30)
    slow_task = noop_task(slow, "slow")
    with Notes(pg_dsn, debounced.schema) as notes:
        slow_task.delay(1)  # leading edge: sent now
        slow_task.delay(2)  # trailing edge: due only 30 s later...
        notifier = slow._notifier
        assert notifier is not None and notifier._thread is not None
        thread = notifier._thread
        slow.close()  # ...or when the app closes
        assert not thread.is_alive()
        assert [queue for _, queue, _ in notes.wait_for(2)] == ["slow", "slow"]
        slow_task.delay(3)  # an app used again after close() starts a new notifier: a leading edge again
        assert [queue for _, queue, _ in notes.wait_for(3)] == ["slow"] * 3
    slow.close()


def test_notify_debounce_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    assert TaskPG(dsn).notify_debounce is None and TaskPG(dsn).announce is None
    monkeypatch.setenv("TASKPG_NOTIFY_DEBOUNCE", "0.005")
    assert TaskPG(dsn).notify_debounce == 0.005
    assert TaskPG(dsn, notify_debounce=0.02).notify_debounce == 0.02  # the argument wins
    monkeypatch.setenv("TASKPG_NOTIFY_DEBOUNCE", "soon")
    with pytest.raises(ConfigurationError, match="TASKPG_NOTIFY_DEBOUNCE"):
        TaskPG(dsn)
    monkeypatch.setenv("TASKPG_NOTIFY_DEBOUNCE", "")
    assert TaskPG(dsn).notify_debounce is None
    for bad in (-1, True, "0.1", 3600):
        with pytest.raises(ConfigurationError, match="notify_debounce"):
            TaskPG(dsn, notify_debounce=bad)  # type: ignore[arg-type]


# -- examples/transactional.py: commit -> 1 job, rollback -> 0 jobs ---------------------------------------


def test_transactional_example(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    stdout = run_example("transactional.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    lines = stdout.splitlines()
    assert "committed: 1 order(s), 1 job(s)" in lines, stdout
    assert "rolled back: 0 order(s), 0 job(s)" in lines, stdout

    # What the database holds afterwards: the one committed job, waiting; no orders table.
    rows = db.execute(f'SELECT task, queue, state, args FROM "{schema}".jobs').fetchall()
    assert rows == [("shop.ship_order", "shipping", "available", [1])]
    tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
    assert ("orders",) not in tables
