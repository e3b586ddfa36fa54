"""docs/reliability.md: lost leases, rescued workers, outcomes that cannot be stored, Postgres going away."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from support.processes import WorkerProcess, execution_pids, wait_watching_workers, worker_id_of
from support.rows import job_row

from taskpg import DatabaseUnavailable, TaskPG, migrate
from taskpg.embedded import LocalCluster, _local_binaries
from taskpg.heartbeat import Heartbeat
from taskpg.store import WorkerInfo

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import SimpleNamespace


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
    assert job_row(db, app, handle.id)["state"] == "running"
    assert write_outcomes(store, [Outcome(second, JobState.SUCCEEDED, result='"fresh"')], app.tasks) == [handle.id]
    # A finished job stays finished.
    assert write_outcomes(store, [Outcome(second, JobState.AVAILABLE, refund=1)], app.tasks) == []
    stored = job_row(db, app, handle.id)
    assert (stored["state"], stored["result"]) == ("succeeded", "fresh")


def test_rescue_returns_jobs_of_a_silent_worker(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def work() -> str:
        return "done"

    handle = work.delay()
    app.store.claim(["default"], 1, "gone-worker")  # claimed by a worker that never heartbeats again
    with run_worker(app, heartbeat_interval=0.2, rescue_after=1.0):
        assert handle.get(timeout=10) == "done"
    stored = job_row(db, app, handle.id)
    assert stored["attempt"] == 2
    assert stored["errors"][0]["type"] == "WorkerLost" and stored["errors"][0]["worker"] == "gone-worker"


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


@pytest.mark.slow
def test_sigkilled_worker_job_is_rescued_and_finished_by_another(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    first = spawn(concurrency=2)
    first.wait_ready()
    handle = tasks.sleepy.delay(5, 7)
    wait_watching_workers(
        "the job to start on the first worker", lambda: execution_pids(db, migrated_schema, handle.id), 15, [first]
    )
    assert execution_pids(db, migrated_schema, handle.id) == [first.pid]
    first_id = worker_id_of(db, migrated_schema, first.pid)

    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.proc.wait(10) == -signal.SIGKILL
    assert job_row(db, migrated_schema, handle.id)["state"] == "running"  # nobody knows yet

    second = spawn(concurrency=2)

    def done() -> dict[str, Any] | None:
        row = job_row(db, migrated_schema, handle.id)
        return row if row["state"] in ("succeeded", "dead") else None

    row = wait_watching_workers(
        "the second worker to finish the job", done, 15 - (time.monotonic() - killed_at), [second]
    )
    assert row["state"] == "succeeded", row
    assert row["attempt"] == 2
    assert row["result"] == 7
    assert [e["type"] for e in row["errors"]] == ["WorkerLost"], row["errors"]
    assert row["errors"][0]["attempt"] == 1
    assert row["errors"][0]["worker"] == first_id
    assert execution_pids(db, migrated_schema, handle.id) == [first.pid, second.pid]
    second.stop()


# -- Postgres going away: the worker reconnects and LISTEN recovers; enqueue fails clearly, loses nothing.
# These tests restart a private Postgres cluster they start themselves (the machine's initdb/pg_ctl),
# so the shared server is never disturbed.


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path("/tmp") / f"taskpg-outage-{time.monotonic_ns()}"  # short: Unix socket paths are limited
    base.mkdir()
    base.chmod(0o755)
    private = LocalCluster(base / "pgdata")
    private.start()
    yield private
    if private.is_running():
        private.stop()


@pytest.mark.slow
@pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine")
def test_worker_survives_a_postgres_restart_and_listen_recovers(cluster: LocalCluster, run_worker: Any) -> None:
    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)

    @app.task
    def echo(x: int) -> int:
        return x

    with run_worker(app, poll_interval=60) as worker:  # only NOTIFY can wake it quickly
        assert echo.delay(1).get(timeout=10) == 1
        cluster.restart()
        # Jobs enqueued while the worker is reconnecting are not lost.
        during = echo.delay(2)
        assert during.get(timeout=20) == 2
        deadline = time.monotonic() + 20
        while not worker.listening.is_set():
            assert time.monotonic() < deadline, "the listener did not reconnect"
            time.sleep(0.05)
        time.sleep(0.3)
        after = echo.delay(3)
        assert after.get(timeout=10) == 3  # well before the 60 s poll: the NOTIFY woke the worker
    app.close()


@pytest.mark.slow
@pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine")
def test_enqueue_while_postgres_is_down_raises_and_writes_nothing(cluster: LocalCluster) -> None:
    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)
    app.store.connections.connect_timeout = 2

    @app.task
    def echo(x: int) -> int:
        return x

    echo.delay(0)  # the pool is open and warm
    cluster.stop()
    with pytest.raises(DatabaseUnavailable, match="postgres"):
        echo.delay(1)
    with pytest.raises(DatabaseUnavailable):
        echo.delay_many([(2,), (3,)])
    cluster.start()
    handle = echo.delay(4)  # the pool recovers by itself once the server is back
    with psycopg.connect(cluster.dsn) as conn:
        args = [r[0] for r in conn.execute("SELECT args FROM taskpg.jobs ORDER BY created_at").fetchall()]
    assert args == [[0], [4]]
    assert handle.status == "PENDING"
    app.close()
