"""The worker as a separate OS process: ``python -m taskpg worker -A proc_tasks``.

Every test starts real worker processes on its own migrated schema, drives them with signals
and reads the outcome from the database. ``proc_tasks`` records each execution (job id, n, pid)
in ``<schema>.executions``, so "ran exactly once" and "ran in that process" are checked on rows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import proc_tasks
import pytest
from psycopg.rows import dict_row

import taskpg
from taskpg import Task, TaskPG

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import psycopg

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
# The worker processes import the same taskpg as this test process.
TASKPG_ROOT = Path(taskpg.__file__).resolve().parent.parent


class WorkerProcess:
    """One ``taskpg worker`` process; its stderr goes to a file (a pipe nobody reads could fill up)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._stderr = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, cwd=TESTS_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- stderr of worker pid {self.pid} (last {lines} lines) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(f"worker {self.pid} to be ready", lambda: " ready: queues=" in self.log(), timeout, [self])

    def wait_exit(self, timeout: float, what: str) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: worker {self.pid} still running after {timeout} s\n{self.tail()}")

    def stop(self, timeout: float = 20) -> None:
        """Graceful stop that must succeed: SIGTERM, exit code 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout, "stopping with SIGTERM")
        assert code == 0, f"worker {self.pid} exited with {code} after SIGTERM\n{self.tail()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, workers: Sequence[WorkerProcess] = ()) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail clearly on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for worker in workers:
            if worker.proc.poll() is not None:
                pytest.fail(
                    f"worker {worker.pid} exited with code {worker.proc.returncode} while waiting for {what}\n"
                    + worker.tail()
                )
        if time.monotonic() >= deadline:
            tails = "\n".join(worker.tail() for worker in workers)
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}\n{tails}")
        time.sleep(0.1)


@pytest.fixture
def spawn(pg_dsn: str, migrated_schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn(concurrency=4, grace=10, ...)`` starts a worker process; leftovers are killed after the test."""
    started: list[WorkerProcess] = []
    env = {
        **os.environ,
        "TASKPG_DSN": pg_dsn,
        "TASKPG_SCHEMA": migrated_schema,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TASKPG_ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }

    def start(
        *, concurrency: int = 4, grace: float = 10, pool: str = "threads", prefetch: int | None = None
    ) -> WorkerProcess:
        argv = [sys.executable, "-m", "taskpg", "worker", "-A", "proc_tasks", "-Q", "default"]
        argv += ["-c", str(concurrency), "--pool", pool, "--grace", str(grace)]
        argv += ["--heartbeat", "0.5", "--rescue-after", "2", "--poll-interval", "1", "-l", "info"]
        if prefetch is not None:
            argv += ["--prefetch", str(prefetch)]
        worker = WorkerProcess(argv, env, tmp_path / f"worker-{len(started)}.stderr")
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.close()


@pytest.fixture
def tasks(app: TaskPG, db: psycopg.Connection) -> SimpleNamespace:
    """proc_tasks' tasks bound to the test's app (same names and options), and the executions table."""
    db.execute(
        f'CREATE TABLE "{app.schema}".executions '
        "(job_id uuid NOT NULL, n int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    return SimpleNamespace(**{t.fn.__name__: Task(app, t.fn, t.name, t.options) for t in proc_tasks.app.tasks.values()})


# -- reading the database ------------------------------------------------------------------------


def state_counts(db: psycopg.Connection, schema: str) -> dict[str, int]:
    return dict(db.execute(f'SELECT state, count(*) FROM "{schema}".jobs GROUP BY state').fetchall())


def job(db: psycopg.Connection, schema: str, job_id: str) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f'SELECT * FROM "{schema}".jobs WHERE id = %s', (job_id,)).fetchone()
    assert row is not None, f"job {job_id} is missing"
    return row


def execution_pids(db: psycopg.Connection, schema: str, job_id: str) -> list[int]:
    rows = db.execute(f'SELECT pid FROM "{schema}".executions WHERE job_id = %s ORDER BY at', (job_id,)).fetchall()
    return [r[0] for r in rows]


def execution_count(db: psycopg.Connection, schema: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".executions').fetchone()
    return int(row[0]) if row else 0


def worker_id_of(db: psycopg.Connection, schema: str, pid: int) -> str:
    row = db.execute(f'SELECT id FROM "{schema}".workers WHERE pid = %s', (pid,)).fetchone()
    assert row is not None, f"worker pid {pid} is not registered"
    return str(row[0])


# -- tests -------------------------------------------------------------------------------------------


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

    wait_for(f"{total} jobs to finish", finished, 60, workers)
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


def test_sigkilled_worker_job_is_rescued_and_finished_by_another(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    first = spawn(concurrency=2)
    first.wait_ready()
    handle = tasks.sleepy.delay(5, 7)
    wait_for(
        "the job to start on the first worker", lambda: execution_pids(db, migrated_schema, handle.id), 15, [first]
    )
    assert execution_pids(db, migrated_schema, handle.id) == [first.pid]
    first_id = worker_id_of(db, migrated_schema, first.pid)

    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.proc.wait(10) == -signal.SIGKILL
    assert job(db, migrated_schema, handle.id)["state"] == "running"  # nobody knows yet

    second = spawn(concurrency=2)

    def done() -> dict[str, Any] | None:
        row = job(db, migrated_schema, handle.id)
        return row if row["state"] in ("succeeded", "dead") else None

    row = wait_for("the second worker to finish the job", done, 15 - (time.monotonic() - killed_at), [second])
    assert row["state"] == "succeeded", row
    assert row["attempt"] == 2
    assert row["result"] == 7
    assert [e["type"] for e in row["errors"]] == ["WorkerLost"], row["errors"]
    assert row["errors"][0]["attempt"] == 1
    assert row["errors"][0]["worker"] == first_id
    assert execution_pids(db, migrated_schema, handle.id) == [first.pid, second.pid]
    second.stop()


def test_sigterm_hands_back_unstarted_jobs_and_loses_none(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    total = 40
    worker = spawn(concurrency=4, prefetch=4, grace=20)
    worker.wait_ready()
    ids = tasks.sleepy.delay_many([(0.3, i) for i in range(total)])
    wait_for("some executions", lambda: execution_count(db, migrated_schema) > 0, 15, [worker])

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
    wait_for(
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


def test_second_sigterm_aborts_and_puts_the_running_job_back(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(concurrency=1, grace=60)
    worker.wait_ready()
    handle = tasks.sleepy.delay(60, 1)
    wait_for("the job to start", lambda: execution_pids(db, migrated_schema, handle.id), 15, [worker])
    worker_id = worker_id_of(db, migrated_schema, worker.pid)

    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert worker.proc.poll() is None, f"the worker did not wait for its running job\n{worker.tail()}"
    assert job(db, migrated_schema, handle.id)["state"] == "running"
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait_exit(10, "abort on the second SIGTERM")
    assert code == 1, f"exit code {code} after an abort\n{worker.tail()}"

    row = job(db, migrated_schema, handle.id)
    assert (row["state"], row["attempt"], row["worker_id"]) == ("available", 1, None), row
    assert row["errors"][-1]["type"] == "WorkerShutdown", row["errors"]
    assert row["errors"][-1]["worker"] == worker_id
    assert execution_pids(db, migrated_schema, handle.id) == [worker.pid]
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".workers').fetchone() == (0,), "not unregistered"


def test_info_log_has_one_start_and_one_finish_line_per_job(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(concurrency=2)
    worker.wait_ready()
    ok_ids = tasks.record.delay_many([(i,) for i in range(5)])
    failed = tasks.fail.delay(99)
    wait_for(
        "the jobs to finish",
        lambda: state_counts(db, migrated_schema) == {"succeeded": 5, "dead": 1},
        15,
        [worker],
    )
    worker.stop()
    log = worker.log()

    expected = [(job_id, "proc_tasks.record", "succeeded") for job_id in ok_ids]
    expected.append((failed.id, "proc_tasks.fail", "dead"))
    for job_id, task_name, outcome in expected:
        lines = [line for line in log.splitlines() if job_id in line]
        started = [line for line in lines if re.search(rf"job {job_id} {task_name} attempt 1 started$", line)]
        finished = [
            line for line in lines if re.search(rf"job {job_id} {task_name} attempt 1 {outcome} in \d+\.\d ms$", line)
        ]
        assert len(started) == 1 and len(finished) == 1 and len(lines) == 2, (
            f"job {job_id}: expected one start and one finish line, got:\n" + "\n".join(lines)
        )
        assert all(" INFO taskpg.worker: " in line for line in lines), lines


def test_processes_pool_enforces_time_limits(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    worker = spawn(pool="processes", concurrency=2)
    worker.wait_ready()
    hung = tasks.hang.delay(1)
    soft = tasks.soft.delay(2)

    def finished(job_id: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            row = job(db, migrated_schema, job_id)
            return row if row["state"] in ("succeeded", "dead") else None

        return check

    soft_row = wait_for("the soft-limited job to finish", finished(soft.id), 15, [worker])
    assert (soft_row["state"], soft_row["result"]) == ("succeeded", "soft"), soft_row
    hung_row = wait_for("the hard-limited job to be killed", finished(hung.id), 15, [worker])
    assert hung_row["state"] == "dead", hung_row
    assert hung_row["attempt"] == 1
    assert hung_row["errors"][-1]["type"] == "TimeLimitExceeded", hung_row["errors"]
    assert "time_limit" in hung_row["errors"][-1]["message"]

    # The same worker goes on: two more jobs run (in children, one of them started to replace the killed one).
    after = tasks.sleepy.delay_many([(0.5, 10), (0.5, 11)])
    for job_id in after:
        row = wait_for("a job after the kill to finish", finished(job_id), 15, [worker])
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
