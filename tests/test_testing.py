"""docs/testing.md: the pytest plugin's fixtures and drain(), used as a user of taskpg would use them.

These tests use only the plugin's fixtures (taskpg_app on a fresh schema of its own), not this suite's conftest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from taskpg import Status, chain, chord
from taskpg.testing import TEST_SCHEMA_PREFIX, drain

if TYPE_CHECKING:
    from taskpg import TaskPG


def test_drain_runs_the_due_jobs_with_the_real_executor(taskpg_app: TaskPG) -> None:
    @taskpg_app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @taskpg_app.task(name="t.broken", max_retries=0)
    def broken() -> None:
        raise ValueError("no")

    done, dead = add.delay(2, 3), broken.delay()
    bad = add.delay("a")  # too few arguments: the executor's own check, as in a worker
    assert drain(taskpg_app) == {"succeeded": 1, "dead": 2}
    assert done.get(timeout=5) == 5 and dead.status == Status.FAILURE
    assert bad.record() is not None and bad.record()["errors"][-1]["type"] == "ArgumentMismatch"
    assert drain(taskpg_app) == {}  # nothing left


def test_drain_follows_canvases_and_runs_async_tasks(taskpg_app: TaskPG) -> None:
    @taskpg_app.task(name="t.inc")
    def inc(n: int) -> int:
        return n + 1

    @taskpg_app.task(name="t.total")
    async def total(numbers: list[int]) -> int:
        return sum(numbers)

    res = chain(inc.s(0), inc.s(), inc.s()).apply_async()
    gathered = chord([inc.s(n) for n in range(3)], total.s())()
    counts = drain(taskpg_app)
    assert counts == {"succeeded": 3 + 3 + 1}
    assert res.get(timeout=5) == 3 and gathered.get(timeout=5) == 6


def test_with_scheduled_runs_retries_and_countdowns_now(taskpg_app: TaskPG) -> None:
    attempts: list[int] = []

    @taskpg_app.task(name="t.flaky", bind=True, autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=60)
    def flaky(self: Any) -> str:
        attempts.append(self.request.attempt)
        raise ConnectionError("down")

    @taskpg_app.task(name="t.later")
    def later() -> str:
        return "ran"

    handle, waiting = flaky.delay(), later.apply_async(countdown=3600)
    assert drain(taskpg_app) == {"scheduled": 1}  # the first attempt; its retry waits a minute
    assert waiting.status == Status.PENDING
    assert drain(taskpg_app, with_scheduled=True) == {"scheduled": 1, "dead": 1, "succeeded": 1}
    assert attempts == [1, 2, 3] and handle.status == Status.FAILURE and waiting.get(timeout=5) == "ran"


def test_the_fixture_schema_is_fresh_and_dropped_after(taskpg_app: TaskPG, taskpg_schema: str) -> None:
    assert taskpg_app.schema == taskpg_schema and taskpg_schema.startswith(TEST_SCHEMA_PREFIX)
    assert taskpg_app.store.job_counts() == {}
    other = type(taskpg_app)(taskpg_app.dsn, schema="taskpg")
    try:
        with pytest.raises(ValueError, match="not made by a test"):
            other.store.drop_test_schema(TEST_SCHEMA_PREFIX)
    finally:
        other.close()


def test_drain_gets_past_expired_jobs_and_leaves_paused_queues_alone(taskpg_app: TaskPG) -> None:
    import datetime as dt

    @taskpg_app.task(name="t.ping")
    def ping(n: int) -> int:
        return n

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    for n in range(150):  # more than one claim round of expired jobs at the head of the queue
        ping.apply_async((n,), expires=past)
    behind = ping.delay(-1)
    taskpg_app.pause_queue("held")
    held = ping.apply_async((0,), queue="held")
    assert drain(taskpg_app, ["default", "held"]) == {"succeeded": 1}
    assert behind.get(timeout=5) == -1 and held.status == Status.PENDING
