"""docs/time-limits.md: soft and hard time limits in the threads and processes pools, for sync and async tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from support.processes import WorkerProcess, execution_pids, wait_watching_workers
from support.rows import job_row

from taskpg import SoftTimeLimitExceeded, TaskPG, TimeLimitExceeded

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import SimpleNamespace

    import psycopg


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
    stored = job_row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 2)
    assert [e["type"] for e in stored["errors"]] == ["TimeLimitExceeded", "TimeLimitExceeded"]
    assert "abandoned" in caplog.text


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
        handle = slow.delay()
        error = handle.get(timeout=10, propagate=False)
        assert handle.status == "FAILURE"
        assert "ran past 0.2 s" in str(error)  # cancelled at its soft limit, not left to the hard one


@pytest.mark.slow
def test_processes_pool_enforces_time_limits(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(pool="processes", concurrency=2)
    worker.wait_ready()
    hung = tasks.hang.delay(1)
    soft = tasks.soft.delay(2)

    def finished(job_id: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            row = job_row(db, migrated_schema, job_id)
            return row if row["state"] in ("succeeded", "dead") else None

        return check

    soft_row = wait_watching_workers("the soft-limited job to finish", finished(soft.id), 15, [worker])
    assert (soft_row["state"], soft_row["result"]) == ("succeeded", "soft"), soft_row
    hung_row = wait_watching_workers("the hard-limited job to be killed", finished(hung.id), 15, [worker])
    assert hung_row["state"] == "dead", hung_row
    assert hung_row["attempt"] == 1
    assert hung_row["errors"][-1]["type"] == "TimeLimitExceeded", hung_row["errors"]
    assert "time_limit" in hung_row["errors"][-1]["message"]

    # The same worker goes on: two more jobs run (in children, one of them started to replace the killed one).
    after = tasks.sleepy.delay_many([(0.5, 10), (0.5, 11)])
    for job_id in after:
        row = wait_watching_workers("a job after the kill to finish", finished(job_id), 15, [worker])
        assert (row["state"], row["result"]) == ("succeeded", row["args"][1]), row
    child_pids = {execution_pids(db, migrated_schema, job_id)[0] for job_id in after}
    assert worker.pid not in child_pids, "the processes pool ran a job in the worker process itself"
    hung_pids = execution_pids(db, migrated_schema, hung.id)
    # The hung child is gone (killed and reaped), not just abandoned. Its row can be missing: the parent's clock
    # for time_limit starts before a fresh child has imported the tasks, which can take most of that second.
    for pid in hung_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert pid not in child_pids
    assert worker.proc.poll() is None
    worker.stop()


@pytest.mark.parametrize("pool", ["threads", "async"])
def test_a_hard_limit_stops_the_function_in_the_threads_and_async_pools(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str, pool: str
) -> None:
    """A task with a time_limit runs in a child process (the worker knows its -A module), which is killed at
    the limit: the function really stops, so a retry can never overlap it."""
    worker = spawn(concurrency=2, pool=pool)
    worker.wait_ready()
    handle = tasks.hang.delay(1)  # time_limit=1, max_retries=0, sleeps 30 s
    row = wait_watching_workers(
        "the attempt to be failed",
        lambda: (r := job_row(db, migrated_schema, handle.id))["state"] == "dead" and r,
        30,
        [worker],
    )
    assert [e["type"] for e in row["errors"]] == ["TimeLimitExceeded"], row["errors"]
    (pid,) = execution_pids(db, migrated_schema, handle.id)
    assert pid != worker.pid  # it ran in a child...
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ...which is gone: the function was stopped, not abandoned
    assert "killing its child process" in worker.log()
    worker.stop()
