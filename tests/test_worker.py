"""The worker in-process against real Postgres: results, order, schedules, retries, dead letters."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from taskpg import Reject, Snooze, SoftTimeLimitExceeded, TaskPG, TimeLimitExceeded
from taskpg.exceptions import TaskError

if TYPE_CHECKING:
    import psycopg


def row(db: psycopg.Connection, app: TaskPG, job_id: str) -> dict[str, Any]:
    cur = db.execute(f'SELECT * FROM "{app.schema}".jobs WHERE id = %s', (job_id,))
    values = cur.fetchone()
    assert values is not None
    return dict(zip([c.name for c in cur.description or ()], values, strict=True))


def wait_for(predicate: Any, timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.05)


def test_results_sync_async_and_ignored(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def slow_double(x: int) -> int:
        await asyncio.sleep(0.01)
        return 2 * x

    @app.task(ignore_result=True)
    def fire_and_forget() -> str:
        return "not stored"

    with run_worker(app):
        assert add.delay(2, 3).get(timeout=10) == 5
        assert slow_double.delay(21).get(timeout=10) == 42
        handle = fire_and_forget.delay()
        assert handle.get(timeout=10) is None
    stored = row(db, app, handle.id)
    assert stored["state"] == "succeeded" and stored["result"] is None


@pytest.mark.parametrize("pool", ["threads", "async"])
def test_async_and_sync_tasks_in_each_pool(app: TaskPG, run_worker: Any, pool: str) -> None:
    seen_threads: set[str] = set()

    @app.task
    async def coro(x: int) -> int:
        await asyncio.sleep(0.05)
        return x

    @app.task
    def plain(x: int) -> int:
        seen_threads.add(threading.current_thread().name)
        return x

    with run_worker(app, pool=pool, concurrency=20):
        started = time.monotonic()
        handles = [coro.delay(n) for n in range(20)]
        assert [h.get(timeout=10) for h in handles] == list(range(20))
        # 20 sleeps of 50 ms overlap: far less than running them one after another.
        assert time.monotonic() - started < 0.9
        assert plain.delay(7).get(timeout=10) == 7
    assert seen_threads


def test_priority_then_age_order(app: TaskPG, run_worker: Any) -> None:
    order: list[str] = []

    @app.task
    def note(label: str) -> None:
        order.append(label)

    note.apply_async(args=("low-1",), priority=0)
    note.apply_async(args=("high",), priority=9)
    note.apply_async(args=("low-2",), priority=0)
    last = note.apply_async(args=("urgent",), priority=20)
    with run_worker(app, concurrency=1, prefetch=0):
        wait_for(lambda: len(order) == 4, message="4 jobs")
    assert last.id and order == ["urgent", "high", "low-1", "low-2"]


def test_countdown_job_starts_on_time(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def later() -> None:
        return None

    with run_worker(app, poll_interval=30):
        handle = later.apply_async(countdown=1.0)
        handle.get(timeout=10)
    stored = row(db, app, handle.id)
    lateness = (stored["started_at"] - stored["run_at"]).total_seconds()
    assert 0 <= lateness < 1.0, lateness


def test_notify_wakes_an_idle_worker_quickly(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def ping() -> None:
        return None

    with run_worker(app, poll_interval=30):
        time.sleep(0.3)  # idle: the worker is waiting, not polling
        handle = ping.delay()
        handle.get(timeout=10)
    stored = row(db, app, handle.id)
    assert (stored["started_at"] - stored["created_at"]).total_seconds() < 0.5


def test_autoretry_with_backoff_then_dead(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(ConnectionError,), max_retries=3, retry_backoff=0.2, retry_jitter=False)
    def flaky() -> None:
        raise ConnectionError("upstream down")

    with run_worker(app):
        handle = flaky.delay()
        with pytest.raises(ConnectionError, match="upstream down"):
            handle.get(timeout=20)
    stored = row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 4)
    errors = stored["errors"]
    assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
    assert all(e["type"] == "ConnectionError" and "upstream down" in e["traceback"] for e in errors)
    times = [dt.datetime.fromisoformat(e["at"]) for e in errors]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert expected <= gap < expected + 0.8, gaps


def test_unlisted_exception_fails_at_once_like_celery(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(ConnectionError,), max_retries=5)
    def broken() -> None:
        raise KeyError("missing")

    with run_worker(app):
        handle = broken.delay()
        with pytest.raises(KeyError):
            handle.get(timeout=10)
    assert row(db, app, handle.id)["attempt"] == 1


def test_bound_retry_with_countdown_and_max_retries(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    attempts: list[int] = []

    @app.task(bind=True, max_retries=10)
    def polite(self: Any, x: int) -> int:
        attempts.append(self.request.attempt)
        if self.request.attempt < 3:
            raise self.retry(countdown=0.1, exc=RuntimeError("not yet"))
        return x * self.request.retries

    @app.task(bind=True, max_retries=10)
    def capped(self: Any) -> None:
        raise self.retry(countdown=0, exc=RuntimeError("give up"), max_retries=1)

    with run_worker(app):
        assert polite.delay(5).get(timeout=10) == 10
        handle = capped.delay()
        with pytest.raises(RuntimeError, match="give up"):
            handle.get(timeout=10)
    assert attempts == [1, 2, 3]
    assert row(db, app, handle.id)["attempt"] == 2


def test_snooze_spends_no_attempt_and_is_capped(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    runs: list[int] = []

    @app.task(max_retries=0)
    def waits_twice(key: str) -> str:
        runs.append(1)
        if len(runs) <= 2:
            raise Snooze(0.1)
        return key

    @app.task(bind=True, max_snoozes=3)
    def forever(self: Any) -> None:
        self.snooze(0)

    with run_worker(app):
        handle = waits_twice.delay("done")
        assert handle.get(timeout=10) == "done"
        looping = forever.delay()
        with pytest.raises(TaskError, match="snoozed 3 times"):
            looping.get(timeout=10)
    stored = row(db, app, handle.id)
    assert (stored["attempt"], stored["snoozes"], stored["errors"]) == (1, 2, [])
    assert row(db, app, looping.id)["errors"][-1]["type"] == "TooManySnoozes"


def test_reject_goes_dead_at_once(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(Exception,), max_retries=5)
    def refuses() -> None:
        raise Reject("malformed order")

    with run_worker(app):
        handle = refuses.delay()
        with pytest.raises(Reject, match="malformed order"):
            handle.get(timeout=10)
    stored = row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 1)


def test_dead_letter_queue_gets_a_copy_with_history(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(dead_letter="payments_dead", autoretry_for=(ValueError,), max_retries=1, retry_backoff=0.05)
    def charge(order: int) -> None:
        raise ValueError(f"declined {order}")

    with run_worker(app):
        handle = charge.delay(7)
        handle.get(timeout=10, propagate=False)
    copies = db.execute(
        f'SELECT task, args, state, attempt, errors FROM "{app.schema}".jobs WHERE queue = %s', ("payments_dead",)
    ).fetchall()
    assert len(copies) == 1
    task, args, state, attempt, errors = copies[0]
    assert (task, args, state, attempt) == (charge.name, [7], "available", 0)
    assert [e["message"] for e in errors] == ["declined 7", "declined 7"]
    assert row(db, app, handle.id)["state"] == "dead"


def test_dead_letter_handler_task_receives_the_job(app: TaskPG, run_worker: Any) -> None:
    received: list[dict[str, Any]] = []

    @app.task(name="on_dead")
    def on_dead(job: dict[str, Any]) -> None:
        received.append(job)

    @app.task(dead_letter="on_dead")
    def explode(x: int) -> None:
        raise RuntimeError(f"boom {x}")

    with run_worker(app):
        handle = explode.delay(3)
        handle.get(timeout=10, propagate=False)
        wait_for(lambda: len(received) == 1, message="dead-letter handler")
    job = received[0]
    assert (job["id"], job["task"], job["args"]) == (handle.id, explode.name, [3])
    assert job["errors"][-1]["message"] == "boom 3"


def insert_raw(db: psycopg.Connection, app: TaskPG, task: str, args: str, kwargs: str = "{}") -> str:
    from taskpg.job import new_job_id

    job_id = new_job_id()
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, args, kwargs, state) '
        "VALUES (%s, %s, 'default', %s::jsonb, %s::jsonb, 'available')",
        (job_id, task, args, kwargs),
    )
    return job_id


def test_bad_jobs_go_dead_with_a_reason_and_the_worker_keeps_going(
    pg_dsn: str, migrated_schema: str, run_worker: Any, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=200)

    @app.task
    def takes_two(a: int, b: int) -> int:
        return a + b

    bad = {
        "unknown": insert_raw(db, app, "no.such.task", "[]"),
        "not a list": insert_raw(db, app, takes_two.name, '{"a": 1}'),
        "mismatch": insert_raw(db, app, takes_two.name, "[1, 2, 3]"),
        "too large": insert_raw(db, app, takes_two.name, "[" + ",".join(["1"] * 200) + "]"),
    }
    with run_worker(app):
        for job_id in bad.values():
            app.AsyncResult(job_id).get(timeout=10, propagate=False)
        assert takes_two.delay(1, 2).get(timeout=10) == 3  # still running fine
    reasons = {name: row(db, app, job_id)["errors"][-1] for name, job_id in bad.items()}
    assert {name: r["type"] for name, r in reasons.items()} == {
        "unknown": "NotRegistered",
        "not a list": "PayloadDecodeError",
        "mismatch": "ArgumentMismatch",
        "too large": "PayloadTooLarge",
    }
    assert "no.such.task" in reasons["unknown"]["message"]
    assert "too many positional arguments" in reasons["mismatch"]["message"]
    assert all(row(db, app, job_id)["state"] == "dead" for job_id in bad.values())
    app.close()


def test_soft_time_limit_raises_inside_a_thread(app: TaskPG, run_worker: Any) -> None:
    @app.task(soft_time_limit=0.3)
    def long_loop() -> str:
        try:
            while True:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "cleaned up"

    with run_worker(app):
        assert long_loop.delay().get(timeout=10) == "cleaned up"


def test_hard_time_limit_in_threads_fails_and_retries_the_attempt(
    app: TaskPG, run_worker: Any, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    @app.task(time_limit=0.3, max_retries=1, retry_backoff=0.05, retry_jitter=False)
    def stuck() -> None:
        release.wait(30)  # blocked in C: a soft limit could not interrupt it

    @app.task
    def after() -> str:
        return "ok"

    caplog.set_level(logging.WARNING, logger="taskpg.worker")
    with run_worker(app, concurrency=1, prefetch=0):
        handle = stuck.delay()
        with pytest.raises(TimeLimitExceeded, match="time_limit"):
            handle.get(timeout=10)
        assert after.delay().get(timeout=10) == "ok"  # a fresh thread took the stuck one's place
        release.set()
    stored = row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 2)
    assert [e["type"] for e in stored["errors"]] == ["TimeLimitExceeded", "TimeLimitExceeded"]
    assert "abandoned" in caplog.text


def test_late_outcome_from_a_lost_lease_changes_nothing(app: TaskPG, db: psycopg.Connection) -> None:
    from taskpg.completer import write_outcomes
    from taskpg.job import JobState, Outcome

    @app.task
    def work() -> None:
        return None

    handle = work.delay()
    store = app.store.on(db)
    (first,) = store.claim(["default"], 1, "old")
    # The old worker went silent; the job was rescued and claimed again by another worker.
    db.execute(f"UPDATE \"{app.schema}\".jobs SET state = 'available' WHERE id = %s", (handle.id,))
    (second,) = store.claim(["default"], 1, "new")
    assert first.lease != second.lease
    assert write_outcomes(store, [Outcome(first, JobState.SUCCEEDED, result='"late"')], app.tasks) == []
    assert row(db, app, handle.id)["state"] == "running"
    assert write_outcomes(store, [Outcome(second, JobState.SUCCEEDED, result='"fresh"')], app.tasks) == [handle.id]
    # A finished job stays finished.
    assert write_outcomes(store, [Outcome(second, JobState.AVAILABLE, refund=1)], app.tasks) == []
    stored = row(db, app, handle.id)
    assert (stored["state"], stored["result"]) == ("succeeded", "fresh")


def test_rescue_returns_jobs_of_a_silent_worker(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def work() -> str:
        return "done"

    handle = work.delay()
    app.store.claim(["default"], 1, "gone-worker")  # claimed by a worker that never heartbeats again
    with run_worker(app, heartbeat_interval=0.2, rescue_after=1.0):
        assert handle.get(timeout=10) == "done"
    stored = row(db, app, handle.id)
    assert stored["attempt"] == 2
    assert stored["errors"][0]["type"] == "WorkerLost" and stored["errors"][0]["worker"] == "gone-worker"


def test_automatic_prefetch_deepens_only_for_very_short_jobs(app: TaskPG, run_worker: Any) -> None:
    from taskpg.worker import AUTO_PREFETCH_MAX, PREFETCH_MULTIPLIER, WorkerSettings

    settings = WorkerSettings(concurrency=4)
    assert settings.prefetch_for(None) == 4 * PREFETCH_MULTIPLIER  # nothing measured yet: Celery's default
    assert settings.prefetch_for(0.0001) == AUTO_PREFETCH_MAX  # 0.1 ms jobs: as deep as allowed
    assert settings.prefetch_for(0.002) == 40  # 2 ms jobs: about 20 ms of work per slot
    assert settings.prefetch_for(0.5) == 4 * PREFETCH_MULTIPLIER  # long jobs: never less than the default
    assert WorkerSettings(concurrency=4, prefetch=0).prefetch_for(0.0001) == 0  # an explicit setting wins

    done: list[int] = []

    @app.task
    def tiny(n: int) -> None:
        done.append(n)

    @app.task
    def slow(n: int) -> None:
        time.sleep(0.03)
        done.append(n)

    tiny.delay_many([(n,) for n in range(600)])
    with run_worker(app, concurrency=4) as worker:
        wait_for(lambda: len(done) == 600, timeout=30, message="600 tiny jobs")
        assert worker.pool is not None and worker.pool.mean_run_time is not None
        assert worker.settings.capacity(worker.pool.mean_run_time) > 4 + 4 * PREFETCH_MULTIPLIER
    done.clear()
    slow.delay_many([(n,) for n in range(12)])
    with run_worker(app, concurrency=4) as worker:
        wait_for(lambda: len(done) == 12, timeout=30, message="12 slow jobs")
        assert worker.pool is not None and worker.pool.mean_run_time is not None
        assert worker.pool.mean_run_time >= 0.02
        assert worker.settings.capacity(worker.pool.mean_run_time) == 4 + 4 * PREFETCH_MULTIPLIER
