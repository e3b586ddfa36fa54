"""notify_debounce: enqueues on the app's connections NOTIFY after their commit, debounced per queue."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import ConfigurationError, TaskPG
from taskpg.notifier import APPLICATION_NAME
from taskpg.sql import Queries

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

WINDOW = 0.05


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


def test_isolated_delay_is_announced_at_once_after_its_commit(debounced: TaskPG, pg_dsn: str) -> None:
    task = noop_task(debounced)
    with Notes(pg_dsn, debounced.schema, count_jobs=True) as notes:
        started = time.monotonic()
        task.delay(1)
        [(arrived, queue, available)] = notes.wait_for(1)
        assert queue == "default" and available == 1  # sent after the commit: the job is there
        assert arrived - started < 0.5  # the leading edge does not wait for the window
        task.delay_many([(2,), (3,)])  # the bulk path announces too (a window later)
        assert [n[1:] for n in notes.wait_for(2)[1:]] == [("default", 3)]


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
            started = time.monotonic()
            assert task.delay(n).get(timeout=5) == n
            assert time.monotonic() - started < 1.5
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
        started = time.monotonic()
        slow.close()  # ...or when the app closes
        assert time.monotonic() - started < 2 and not thread.is_alive()
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
