"""docs/workers.md: results, pools, order, countdowns, NOTIFY wake-ups, prefetch, and worker processes under signals."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from psycopg.rows import dict_row
from support.processes import WorkerProcess, execution_count, execution_pids, wait_watching_workers, worker_id_of
from support.rows import job_row, state_counts
from support.waiting import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import SimpleNamespace

    import psycopg

    from taskpg import TaskPG


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
    stored = job_row(db, app, handle.id)
    assert stored["state"] == "succeeded" and stored["result"] is None


@pytest.mark.parametrize("pool", ["threads", "async"])
def test_async_and_sync_tasks_in_each_pool(app: TaskPG, run_worker: Any, pool: str) -> None:
    seen_threads: set[str] = set()

    @app.task
    async def coro(x: int) -> list[float]:
        began = time.time()
        await asyncio.sleep(0.2)
        return [x, began, time.time()]

    @app.task
    def plain(x: int) -> int:
        seen_threads.add(threading.current_thread().name)
        return x

    with run_worker(app, pool=pool, concurrency=20):
        handles = [coro.delay(n) for n in range(20)]
        results = [h.get(timeout=10) for h in handles]
        assert [r[0] for r in results] == list(range(20))
        # The 20 sleeps ran at the same time, not one after another.
        assert most_at_once([(began, ended) for _, began, ended in results]) >= 10
        assert plain.delay(7).get(timeout=10) == 7
    assert seen_threads


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = best = 0
    for _, change in edges:
        running += change
        best = max(best, running)
    return best


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

    with run_worker(app, poll_interval=3600):  # the stager, not the poll, must start it
        handle = later.apply_async(countdown=1.0)
        handle.get(timeout=10)
    stored = job_row(db, app, handle.id)
    assert stored["started_at"] >= stored["run_at"]  # never early


def test_notify_wakes_an_idle_worker_quickly(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task
    def ping() -> None:
        return None

    with run_worker(app, poll_interval=3600) as worker:  # only a NOTIFY can wake it before get() gives up
        assert worker.listener.signals.wait_for("listening", timeout=10)
        handle = ping.delay()
        handle.get(timeout=10)


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


# -- the worker as an OS process (``python -m taskpg worker -A proc_tasks``), driven with signals -----------


@pytest.mark.slow
def test_two_worker_processes_run_10000_jobs_exactly_once(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    total = 10_000
    workers = [spawn(concurrency=8), spawn(concurrency=8)]
    for worker in workers:
        worker.wait_ready()
    ids = tasks.record.delay_many([(i,) for i in range(total)])

    def finished() -> bool:
        counts = state_counts(db, migrated_schema)
        return counts.get("succeeded", 0) + counts.get("dead", 0) == total

    wait_watching_workers(f"{total} jobs to finish", finished, 60, workers)
    assert state_counts(db, migrated_schema) == {"succeeded": total}
    attempts = dict(db.execute(f'SELECT attempt, count(*) FROM "{migrated_schema}".jobs GROUP BY attempt').fetchall())
    assert attempts == {1: total}, f"some job was claimed more than once: {attempts}"

    rows = db.execute(f'SELECT job_id::text, n, pid FROM "{migrated_schema}".executions').fetchall()
    assert len(rows) == total, f"{len(rows)} executions for {total} jobs"
    assert {r[0] for r in rows} == set(ids), "executions do not match the enqueued job ids one to one"
    assert sorted(r[1] for r in rows) == list(range(total))
    per_pid = Counter(r[2] for r in rows)
    assert set(per_pid) == {w.pid for w in workers}, f"executions per pid: {per_pid}"
    for worker in workers:
        worker.stop()


@pytest.mark.slow
def test_sigterm_hands_back_unstarted_jobs_and_loses_none(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    total = 40
    worker = spawn(concurrency=4, prefetch=4, grace=20)
    worker.wait_ready()
    ids = tasks.sleepy.delay_many([(0.3, i) for i in range(total)])
    wait_watching_workers("some executions", lambda: execution_count(db, migrated_schema) > 0, 15, [worker])

    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait_exit(25, "graceful stop with jobs in flight")
    assert code == 0, f"exit code {code} after one SIGTERM\n{worker.tail()}"
    handed_back = re.findall(r"handed back (\d+) claimed job\(s\) that had not started", worker.log())
    assert len(handed_back) == 1, f"expected one hand-back log line\n{worker.tail()}"

    with db.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"""SELECT j.id::text AS id, j.state, j.attempt, j.started_at IS NOT NULL AS claimed, j.errors,
                       count(e.job_id) AS runs
                FROM "{migrated_schema}".jobs AS j LEFT JOIN "{migrated_schema}".executions AS e ON e.job_id = j.id
                GROUP BY j.id"""
        ).fetchall()
    assert {r["id"] for r in rows} == set(ids)
    assert not [r for r in rows if r["state"] == "running"], "jobs left running after a clean stop"
    ran = [r for r in rows if r["runs"]]
    not_ran = [r for r in rows if not r["runs"]]
    assert ran and not_ran, f"SIGTERM came too late to test anything: {len(ran)} ran, {len(not_ran)} did not"
    for r in ran:
        assert (r["state"], r["attempt"], r["runs"]) == ("succeeded", 1, 1), r
    for r in not_ran:
        assert (r["state"], r["attempt"], r["errors"]) == ("available", 0, []), r
    claimed_not_run = [r for r in not_ran if r["claimed"]]
    assert len(claimed_not_run) == int(handed_back[0]) >= 1, "handed-back jobs must be available with attempt 0"

    second = spawn(concurrency=4)
    wait_watching_workers(
        f"all {total} jobs to succeed",
        lambda: state_counts(db, migrated_schema).get("succeeded", 0) == total,
        20,
        [second],
    )
    second.stop()
    assert state_counts(db, migrated_schema) == {"succeeded": total}
    runs = Counter(r[0] for r in db.execute(f'SELECT job_id::text FROM "{migrated_schema}".executions').fetchall())
    assert set(runs) == set(ids) and set(runs.values()) == {1}, f"some job ran twice or never: {runs}"
    attempts = dict(db.execute(f'SELECT attempt, count(*) FROM "{migrated_schema}".jobs GROUP BY attempt').fetchall())
    assert attempts == {1: total}


@pytest.mark.slow
def test_second_sigterm_aborts_and_puts_the_running_job_back(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(concurrency=1, grace=60)
    worker.wait_ready()
    handle = tasks.sleepy.delay(60, 1)
    wait_watching_workers("the job to start", lambda: execution_pids(db, migrated_schema, handle.id), 15, [worker])
    worker_id = worker_id_of(db, migrated_schema, worker.pid)

    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert worker.proc.poll() is None, f"the worker did not wait for its running job\n{worker.tail()}"
    assert job_row(db, migrated_schema, handle.id)["state"] == "running"
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait_exit(10, "abort on the second SIGTERM")
    assert code == 1, f"exit code {code} after an abort\n{worker.tail()}"

    row = job_row(db, migrated_schema, handle.id)
    assert (row["state"], row["attempt"], row["worker_id"]) == ("available", 1, None), row
    assert row["errors"][-1]["type"] == "WorkerShutdown", row["errors"]
    assert row["errors"][-1]["worker"] == worker_id
    assert execution_pids(db, migrated_schema, handle.id) == [worker.pid]
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".workers').fetchone() == (0,), "not unregistered"


@pytest.mark.slow
def test_info_log_has_one_line_per_finished_attempt_and_a_dead_job_its_error(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(concurrency=2)  # -l info
    worker.wait_ready()
    ok_ids = tasks.record.delay_many([(i,) for i in range(5)])
    failed = tasks.fail.delay(99)
    wait_watching_workers(
        "the jobs to finish",
        lambda: state_counts(db, migrated_schema) == {"succeeded": 5, "dead": 1},
        15,
        [worker],
    )
    worker.stop()
    log = worker.log()
    for job_id in ok_ids:
        lines = [line for line in log.splitlines() if job_id in line]
        assert len(lines) == 1, f"job {job_id}: expected one line, got:\n" + "\n".join(lines)
        assert re.search(
            rf" INFO taskpg.worker: job {job_id} proc_tasks.record attempt 1 succeeded in \d+\.\d ms$", lines[0]
        )
    dead_at = log.index(f"ERROR taskpg.worker: job {failed.id} proc_tasks.fail attempt 1 dead in ")
    dead_entry = log[dead_at:].split("\n2", 1)[0]  # the line and its traceback, up to the next record
    assert "ValueError: fail 99" in dead_entry and "Traceback (most recent call last)" in dead_entry, dead_entry
    assert 'raise ValueError(f"fail {n}")' in dead_entry  # the frame that raised


def test_a_handed_back_job_keeps_its_place_in_its_queue(app: TaskPG, db: Any) -> None:
    """A job handed back unstarted at shutdown keeps its run_at: it is claimed again before the jobs
    enqueued after it, with its attempt given back."""
    from taskpg.completer import write_outcomes
    from taskpg.executor import Executor

    @app.task
    def work(n: int) -> int:
        return n

    first = work.delay(1)
    run_at = job_row(db, app, first.id)["run_at"]
    (claimed,) = app.store.claim(["default"], 1, "stopping-worker")
    later = work.delay(2)  # enqueued while the first was held
    assert write_outcomes(app.store, [Executor.handed_back(claimed)], app.tasks) == [first.id]
    stored = job_row(db, app, first.id)
    assert (stored["state"], stored["attempt"], stored["run_at"]) == ("available", 0, run_at)
    assert [job.id for job in app.store.claim(["default"], 2, "next-worker")] == [first.id, later.id]
