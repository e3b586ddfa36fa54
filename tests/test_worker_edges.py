"""Edge cases found in review: each was a real bug once."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from taskpg import TaskPG
from taskpg.heartbeat import Heartbeat
from taskpg.store import WorkerInfo

if TYPE_CHECKING:
    import psycopg


def job_row(db: psycopg.Connection, app: TaskPG, job_id: str) -> dict[str, Any]:
    cur = db.execute(f'SELECT * FROM "{app.schema}".jobs WHERE id = %s', (job_id,))
    values = cur.fetchone()
    assert values is not None
    return dict(zip([c.name for c in cur.description or ()], values, strict=True))


def test_async_task_with_a_soft_limit_in_the_threads_pool_keeps_its_outcome(app: TaskPG, run_worker: Any) -> None:
    @app.task(soft_time_limit=0.5, time_limit=5)
    async def quick() -> str:
        await asyncio.sleep(0.05)
        return "done"

    @app.task(soft_time_limit=0.2, time_limit=5, max_retries=0)
    async def slow() -> str:
        await asyncio.sleep(3)
        return "too late"

    with run_worker(app):
        assert quick.delay().get(timeout=10) == "done"
        started = time.monotonic()
        handle = slow.delay()
        handle.get(timeout=10, propagate=False)
        assert time.monotonic() - started < 2  # cancelled at its soft limit, not left to the hard one
        assert handle.status == "FAILURE"


def test_nul_characters_in_a_result_do_not_stop_the_outcome_writer(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    @app.task
    def weird() -> str:
        return "a\x00b"

    @app.task
    def fails() -> None:
        raise ValueError("bad\x00byte")

    @app.task
    def fine() -> int:
        return 1

    with run_worker(app):
        bad = weird.delay()
        bad.get(timeout=10, propagate=False)
        failing = fails.delay()
        failing.get(timeout=10, propagate=False)
        assert fine.delay().get(timeout=10) == 1  # outcomes are still being written
    assert job_row(db, app, bad.id)["errors"][-1]["type"] == "OutcomeNotStorable"
    assert "bad\\x00byte" in job_row(db, app, failing.id)["errors"][-1]["message"]


def test_arguments_accepted_at_enqueue_are_not_too_large_for_the_worker(
    pg_dsn: str, migrated_schema: str, run_worker: Any
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=200)

    @app.task
    def take(values: dict[str, list[int]]) -> int:
        return len(values)

    values = {f"k{n}": [1, 2] for n in range(12)}  # close to the limit as compact JSON
    with run_worker(app):
        assert take.delay(values).get(timeout=10) == 12
    app.close()


def test_a_failing_job_in_its_dead_letter_queue_is_not_copied_again(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    @app.task(dead_letter="failures")
    def broken() -> None:
        raise RuntimeError("always")

    with run_worker(app, queues=["default", "failures"]):
        broken.delay().get(timeout=10, propagate=False)
        time.sleep(1.0)  # the copy in "failures" runs and dies too
    rows = db.execute(f'SELECT queue, state FROM "{app.schema}".jobs ORDER BY created_at').fetchall()
    assert rows == [("default", "dead"), ("failures", "dead")]


def test_rescue_waits_a_rescue_period_and_routes_jobs_that_died(app: TaskPG, db: psycopg.Connection) -> None:
    received: list[dict[str, Any]] = []

    @app.task(name="on_dead")
    def on_dead(job: dict[str, Any]) -> None:
        received.append(job)

    @app.task(dead_letter="on_dead", max_retries=0)
    def fragile() -> None:
        return None

    handle = fragile.delay()
    app.store.claim(["default"], 1, "vanished")
    me = WorkerInfo("rescuer", "host", 1, ["default"], 1)
    beat = Heartbeat(app.store, app.tasks, me, 0.1, 1.0, lambda: [])
    beat.beat()
    assert beat.rescue() == 0  # just came in touch: give other workers a rescue period to heartbeat
    time.sleep(1.1)
    assert beat.rescue() == 1
    stored = job_row(db, app, handle.id)
    assert (stored["state"], stored["errors"][-1]["type"]) == ("dead", "WorkerLost")
    handler_jobs = db.execute(f'SELECT kwargs FROM "{app.schema}".jobs WHERE task = %s', ("on_dead",)).fetchall()
    assert [kwargs["job"]["id"] for (kwargs,) in handler_jobs] == [handle.id]
