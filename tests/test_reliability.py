"""docs/reliability.md: lost leases, rescued workers, outcomes that cannot be stored, Postgres going away."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from support.processes import WorkerProcess, execution_count, execution_pids, wait_watching_workers, worker_id_of
from support.rows import job_row, state_counts

from taskpg import DatabaseUnavailable, Task, TaskPG, migrate
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
    # It never started on the silent worker: that claim's attempt was given back, nothing recorded against it.
    assert (stored["attempt"], stored["errors"], stored["rescues"], stored["crashes"]) == (1, [], 1, 0)


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
    app.store.heartbeat(WorkerInfo("vanished", "host", 2, ["default"], 1))
    app.store.record_running("vanished", [handle.id])  # it had started the job
    db.execute(f"""UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '1 hour'""")
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
    # The second run was in a child process of the second worker: a job rescued from a dead worker runs
    # apart, so that if it is what killed the first, it takes no other job along.
    first_run, second_run = execution_pids(db, migrated_schema, handle.id)
    assert first_run == first.pid and parent_of(second_run) == second.pid
    assert (row["rescues"], row["crashes"]) == (1, 1)
    second.stop()


def running_recorded(db: psycopg.Connection, schema: str, job_id: str) -> bool:
    row = db.execute(f'SELECT count(*) FROM "{schema}".workers WHERE %s = ANY(running)', (job_id,)).fetchone()
    return row == (1,)


@pytest.mark.slow
def test_a_crash_charges_only_the_job_that_had_started(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """max_retries=0, one runner and four prefetched jobs: SIGKILL while the first runs. The first used its
    only attempt and is dead; the four that never started keep theirs and run once on the next worker."""
    running = tasks.once.delay(30, 0)
    queued = [tasks.once.delay(0, n) for n in range(1, 5)]
    first = spawn(concurrency=1, prefetch=4)  # claims all five at once, in order: the first one runs
    wait_watching_workers(
        "the first job's start to be written", lambda: running_recorded(db, migrated_schema, running.id), 15, [first]
    )
    wait_watching_workers(
        "the others to be prefetched",
        lambda: all(job_row(db, migrated_schema, h.id)["state"] == "running" for h in queued),
        15,
        [first],
    )
    os.kill(first.pid, signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL
    second = spawn(concurrency=1)

    def finished() -> bool:
        return all(job_row(db, migrated_schema, h.id)["state"] in ("succeeded", "dead") for h in [running, *queued])

    wait_watching_workers("every job to finish", finished, 30, [second])
    dead = job_row(db, migrated_schema, running.id)
    assert (dead["state"], dead["attempt"], dead["crashes"]) == ("dead", 1, 1)
    assert [e["type"] for e in dead["errors"]] == ["WorkerLost"]
    for handle in queued:
        row = job_row(db, migrated_schema, handle.id)
        assert (row["state"], row["attempt"], row["errors"], row["rescues"]) == ("succeeded", 1, [], 1), row
        (pid,) = execution_pids(db, migrated_schema, handle.id)  # it ran once, after the crash,
        assert parent_of(pid) == second.pid  # apart, in a child of the next worker (it was rescued)
    second.stop()


@pytest.mark.slow
def test_a_job_that_kills_its_worker_goes_dead_alone(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """Two poison jobs (os._exit in the task) among 120 healthy ones, threads pool, default retries; a dead
    worker is replaced as a supervisor would. Every healthy job succeeds; each poison job kills one worker,
    then runs apart in a child process until its attempts are spent, and ends dead saying its process died."""
    healthy = tasks.sleepy.delay_many([(0.02, n) for n in range(120)])
    poison = [tasks.poison.delay(1000), tasks.poison.delay(1001)]
    workers = [spawn(concurrency=8)]
    states = f"""SELECT count(*) FILTER (WHERE state IN ('succeeded', 'dead')) FROM "{migrated_schema}".jobs"""
    deadline = time.monotonic() + 120
    while db.execute(states).fetchone() != (122,):
        assert time.monotonic() < deadline, state_counts(db, migrated_schema)
        if workers[-1].proc.poll() is not None:  # it died: start another
            assert workers[-1].proc.returncode == 70
            workers.append(spawn(concurrency=8))
        time.sleep(0.1)
    crashes = len(workers) - 1
    assert 1 <= crashes <= 2  # a poison job takes down at most one worker: after that it runs apart
    for job_id in healthy:
        row = job_row(db, migrated_schema, job_id)
        assert row["state"] == "succeeded", row  # no neighbour of a crash went dead
    reruns = sum(max(0, execution_count_of(db, migrated_schema, job_id) - 1) for job_id in healthy)
    assert reruns <= 8 * crashes  # only jobs running alongside a crash ran again
    for handle in poison:
        row = job_row(db, migrated_schema, handle.id)
        assert row["state"] == "dead" and row["attempt"] == row["max_attempts"], row
        assert "died" in row["errors"][-1]["message"], row["errors"]
        # It really ran each time (once more if its first start was not written yet when it killed the worker).
        assert execution_count_of(db, migrated_schema, handle.id) in (row["max_attempts"], row["max_attempts"] + 1)
    workers[-1].stop()


def execution_count_of(db: psycopg.Connection, schema: str, job_id: str) -> int:
    return len(execution_pids(db, schema, job_id))


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


# -- Issue 16: nothing stuck, nothing charged twice. Each test reproduces one fault with real worker
# processes (the `spawn` fixture: heartbeat 0.5 s, rescue after 2 s) and counts side effects in the
# executions table that every proc_tasks job writes first.


def install_fault(db: psycopg.Connection, schema: str, sqlstate: str) -> None:
    """While a row named 'on' is in <schema>.faults, writing a job as succeeded fails with ``sqlstate``
    (a trigger on this test's own jobs table: the shared server is not reconfigured)."""
    db.execute(f'CREATE TABLE "{schema}".faults (name text PRIMARY KEY)')
    db.execute(f"INSERT INTO \"{schema}\".faults VALUES ('on')")
    db.execute(
        f"""CREATE FUNCTION "{schema}".fail_finish() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM "{schema}".faults) THEN
                    RAISE EXCEPTION 'injected fault' USING ERRCODE = '{sqlstate}';
                END IF;
                RETURN NEW;
            END $$"""
    )
    db.execute(
        f'CREATE TRIGGER fail_finish BEFORE UPDATE ON "{schema}".jobs FOR EACH ROW '
        f"WHEN (NEW.state = 'succeeded') EXECUTE FUNCTION \"{schema}\".fail_finish()"
    )


def runs_per_job(db: psycopg.Connection, schema: str) -> Counter[str]:
    rows = db.execute(f'SELECT job_id::text FROM "{schema}".executions').fetchall()
    return Counter(r[0] for r in rows)


def test_a_read_only_outcome_write_is_retried_not_recorded_as_dead(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """25006 (read-only) is a failed session, never "a value Postgres refuses": the outcome writer backs
    off, no succeeded job is recorded as dead, and everything is written once Postgres accepts writes."""
    install_fault(db, migrated_schema, "25006")
    worker = spawn(concurrency=4)
    worker.wait_ready()
    ids = tasks.record.delay_many([(n,) for n in range(10)])
    wait_watching_workers("the 10 jobs to run", lambda: execution_count(db, migrated_schema) == 10, 15, [worker])
    wait_watching_workers("the writer to fail", lambda: "read-only" in worker.log(), 15, [worker])
    assert state_counts(db, migrated_schema) == {"running": 10}  # nothing written, nothing dead
    db.execute(f'DELETE FROM "{migrated_schema}".faults')
    wait_watching_workers(
        "the outcomes to be written", lambda: state_counts(db, migrated_schema) == {"succeeded": 10}, 30, [worker]
    )
    worker.stop()
    assert runs_per_job(db, migrated_schema) == Counter(ids)  # each ran once
    log = worker.log()
    assert "OutcomeNotStorable" not in log and "Traceback" not in log, worker.tail()
    assert log.count("read-only") <= 6, worker.tail()  # one line per loop and outage, not one per retry


def test_an_outcome_writer_that_keeps_failing_stops_the_worker_with_code_1(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """An error no reconnect mends (here 42501, refused for privileges) must not leave a worker that
    heartbeats for ever while its jobs stay running: it stops claiming and exits with code 1."""
    install_fault(db, migrated_schema, "42501")
    worker = spawn(concurrency=2)
    worker.wait_ready()
    tasks.record.delay_many([(n,) for n in range(3)])
    code = worker.wait_exit(40, "the worker to give up on a writer that keeps failing")
    assert code == 1, worker.tail()
    log = worker.log()
    assert "completer loop has failed for over 2 s" in log, worker.tail()
    assert "outcome(s) could not be written before exit" in log, worker.tail()
    # It unregistered: no live worker row holds the jobs, so other workers rescue them at once.
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".workers').fetchone() == (0,)


def test_a_crashed_background_loop_stops_the_worker_with_code_1(app: TaskPG, db: psycopg.Connection) -> None:
    """A loop whose thread ends (here the stager's, by an exception that is not an Exception) stops the
    worker: no more claims, exit code 1, the reason in the log."""
    from taskpg.worker import Worker

    class Crash(BaseException):
        pass

    @app.task
    def work() -> None:
        return None

    worker = Worker(app, concurrency=2, grace=5)

    def crash() -> float:
        raise Crash("the stager's thread dies")

    worker.stager.step = crash  # type: ignore[method-assign]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the worker kept running with a dead loop"
    assert result == [1] and worker.broken == ["stager"]
    handle = work.delay()
    assert job_row(db, app, handle.id)["state"] == "available"  # nothing claims any more


def test_the_heartbeat_goes_on_until_the_last_outcome_so_grace_does_not_mean_twice(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """A worker finishing its job within --grace after SIGTERM keeps heartbeating: another worker does
    not rescue the job after --rescue-after (2 s here), and the job runs once."""
    first = spawn(concurrency=2, grace=30)
    first.wait_ready()
    handle = tasks.sleepy.delay(4, 1)  # runs longer than rescue_after after the SIGTERM
    wait_watching_workers("the job to start", lambda: execution_pids(db, migrated_schema, handle.id), 15, [first])
    second = spawn(concurrency=2)
    second.wait_ready()
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(30, "finishing the job within grace") == 0, first.tail()
    assert job_row(db, migrated_schema, handle.id)["state"] == "succeeded"
    assert execution_pids(db, migrated_schema, handle.id) == [first.pid], second.tail()
    second.stop()


def test_a_paused_worker_does_not_start_the_jobs_rescued_meanwhile(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    """SIGSTOP past --rescue-after: the others rescue and run the jobs; when the paused worker resumes,
    it checks the lease of each job that waited in its buffer and starts none of them. Only the jobs that
    were running at the pause can run twice."""
    paused = spawn(concurrency=2, prefetch=10)
    paused.wait_ready()
    ids = tasks.sleepy.delay_many([(0.3, n) for n in range(12)])
    wait_watching_workers("the first jobs to start", lambda: execution_count(db, migrated_schema) > 0, 15, [paused])
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        ran_before = runs_per_job(db, migrated_schema)
        rescuer = spawn(concurrency=4)
        wait_watching_workers(
            "the rescuer to finish every job",
            lambda: state_counts(db, migrated_schema) == {"succeeded": 12},
            30,
            [rescuer],
        )
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    buffered = 12 - len(ran_before)
    dropped = wait_watching_workers(
        "the resumed worker to drop the jobs of its buffer",
        lambda: (n := paused.log().count("was rescued while it waited")) >= buffered - 2 and n,
        20,
        [paused],
    )
    paused.stop()
    rescuer.stop()
    runs = runs_per_job(db, migrated_schema)
    assert set(runs) == set(ids)
    twice = [job for job, count in runs.items() if count > 1]
    assert len(twice) <= 2, f"{len(twice)} jobs ran twice (dropped {dropped} of {buffered} buffered)"


@pytest.mark.slow
@pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine")
def test_a_deaf_listen_connection_is_noticed_and_replaced(cluster: LocalCluster, run_worker: Any) -> None:
    """The listener's backend frozen (SIGSTOP): no error, no closed socket, it just hears nothing. Its
    own probe does not come back, so within ~10 s it listens on a new connection; pickup by NOTIFY works
    again, long before the 60 s poll."""
    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)

    @app.task
    def echo(x: int) -> int:
        return x

    with run_worker(app, poll_interval=60) as worker:
        assert echo.delay(1).get(timeout=10) == 1
        with psycopg.connect(cluster.dsn, autocommit=True) as admin:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'taskpg-listener'"
            ).fetchone()
        assert row is not None
        os.kill(row[0], signal.SIGSTOP)
        try:
            # Announced to the frozen backend only: picked up once the listener notices and claims to catch up.
            assert echo.delay(2).get(timeout=25) == 2
            assert worker.listener.signals.count("deaf") >= 1
            assert worker.listener.signals.wait_for("listening", count=2, timeout=10)
            assert echo.delay(3).get(timeout=5) == 3  # woken by NOTIFY on the new connection
        finally:
            os.kill(row[0], signal.SIGCONT)
    app.close()


@pytest.mark.slow
@pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine")
def test_a_read_only_server_is_waited_out_and_nothing_runs_twice(
    cluster: LocalCluster, tmp_path: Path, pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    """A demoted primary (here default_transaction_read_only on, reloaded into every session): the worker
    says so once per loop, backs off, loses nothing and runs nothing twice; enqueueing fails clearly. The
    runs are counted in a ledger on the shared server (ledger_tasks), which stays writable."""
    import ledger_tasks
    from support.paths import SUPPORT
    from support.processes import TASKPG_ROOT

    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)
    task = ledger_tasks.sleepy
    sleepy = Task(app, task.fn, task.name, task.options)
    db.execute(f'CREATE TABLE "{migrated_schema}".ledger (job_id uuid NOT NULL, n int NOT NULL, pid int NOT NULL)')
    admin = psycopg.connect(cluster.dsn, autocommit=True, options="-c default_transaction_read_only=off")
    env = {**os.environ, "TASKPG_DSN": cluster.dsn, "TASKPG_SCHEMA": "taskpg"}
    env |= {"LEDGER_DSN": pg_dsn, "LEDGER_TABLE": f"{migrated_schema}.ledger"}
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(TASKPG_ROOT)])
    argv = [sys.executable, "-m", "taskpg", "worker", "-A", "ledger_tasks", "-c", "4", "--heartbeat", "0.5"]
    worker = WorkerProcess([*argv, "--rescue-after", "2", "-l", "info"], env, tmp_path / "worker.stderr")

    def succeeded() -> bool:
        return admin.execute("SELECT count(*) FROM taskpg.jobs WHERE state = 'succeeded'").fetchone() == (12,)

    try:
        worker.wait_ready()
        ids = sleepy.delay_many([(0.5, n) for n in range(12)])
        wait_watching_workers("jobs to start", lambda: ledger(db, migrated_schema), 15, [worker])
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
        # The outcome writer meets it too: outcomes of jobs that finished wait, in memory, not turned into errors.
        wait_watching_workers(
            "the outcome writer to hit it", lambda: "completer: Postgres is read-only" in worker.log(), 20, [worker]
        )
        with pytest.raises(DatabaseUnavailable, match="read-only"):
            sleepy.delay(0, 99)
        admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        admin.execute("SELECT pg_reload_conf()")
        wait_watching_workers("every job to succeed", succeeded, 60, [worker])
        worker.stop()
        assert ledger(db, migrated_schema) == Counter(ids)  # each ran once
        log = worker.log()
        assert "Traceback" not in log and "OutcomeNotStorable" not in log, worker.tail()
        assert 1 <= log.count("read-only") <= 8, worker.tail()
    finally:
        worker.close()
        admin.close()
        app.close()


def parent_of(pid: int) -> int:
    """The parent process of a live process (from /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def ledger(db: psycopg.Connection, schema: str) -> Counter[str]:
    return Counter(r[0] for r in db.execute(f'SELECT job_id::text FROM "{schema}".ledger').fetchall())
