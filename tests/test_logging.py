"""docs/logging.md: quiet by default, every failure with its error, job context on records, and a log sink
that blocks can never stall the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest
from support.processes import TASKPG_ROOT, stop_cleanly, taskpg_command, taskpg_env, wait_watching_workers
from support.rows import state_counts

from taskpg import logs

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import SimpleNamespace

    import psycopg


WORKER = ("worker", "-A", "proc_tasks", "-Q", "default", "--grace", "5")


def run_to_completion(
    pg_dsn: str, schema: str, log: Path, db: psycopg.Connection, expected: dict[str, int], *extra: str
) -> str:
    """Run a worker with its output in ``log`` until the jobs reach ``expected`` states; returns the log."""
    with (
        open(log, "wb") as out,
        taskpg_command(*WORKER, *extra, env=taskpg_env(pg_dsn, schema), stdout=out, stderr=out) as proc,
    ):
        wait_watching_workers("the jobs to finish", lambda: state_counts(db, schema) == expected, 60)
        stop_cleanly(proc)
    return log.read_text()


def test_the_default_level_writes_nothing_per_success_and_every_failure_with_its_traceback(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection, tmp_path: Path
) -> None:
    ok = tasks.record.delay_many([(n,) for n in range(50)])
    failed = tasks.fail.delay(7)
    log = run_to_completion(pg_dsn, migrated_schema, tmp_path / "worker.log", db, {"succeeded": 50, "dead": 1})
    assert not any(job_id in log for job_id in ok)  # nothing per successful job at the default level (warning)
    assert " INFO " not in log
    assert f"ERROR taskpg.worker: job {failed.id} proc_tasks.fail attempt 1 dead in " in log
    assert "ValueError: fail 7" in log and "Traceback (most recent call last)" in log


def test_third_party_loggers_stay_at_warning_unless_debug(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection, tmp_path: Path
) -> None:
    tasks.chatty.delay(1)
    info = run_to_completion(pg_dsn, migrated_schema, tmp_path / "info.log", db, {"succeeded": 1}, "-l", "info")
    assert "attempt 1 succeeded" in info  # taskpg's own INFO lines
    assert "third-party info" not in info and "third-party warning" in info
    tasks.chatty.delay(2)
    debug = run_to_completion(pg_dsn, migrated_schema, tmp_path / "debug.log", db, {"succeeded": 2}, "-l", "debug")
    assert "third-party info" in debug


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_records_logged_inside_a_task_carry_the_job(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection, tmp_path: Path, pool: str
) -> None:
    handle = tasks.chatty.delay(3)
    log = run_to_completion(
        pg_dsn, migrated_schema, tmp_path / "w.log", db, {"succeeded": 1}, "--pool", pool, "--log-format", "json"
    )
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    inside = [e for e in entries if e["message"] == "third-party warning 3"]
    assert len(inside) == 1, log
    assert inside[0]["job_id"] == handle.id and inside[0]["task"] == "proc_tasks.chatty"
    assert (inside[0]["queue"], inside[0]["attempt"], inside[0]["level"]) == ("default", 1, "warning")
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)


@pytest.mark.slow
def test_a_worker_whose_output_nobody_reads_still_drains_10000_jobs(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection
) -> None:
    """stdout and stderr on pipes that nobody reads: the pipe fills after ~64 KiB of lines. Logging used to
    block every runner thread then (while heartbeats kept the jobs leased): 258 of 10,000 done."""
    tasks.record.delay_many([(n,) for n in range(10_000)])
    argv = (*WORKER, "-l", "debug", "-c", "8")  # two lines per job (started, succeeded): more than the queue holds
    read: list[bytes] = []
    env = taskpg_env(pg_dsn, migrated_schema)
    with taskpg_command(*argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_watching_workers(
            "10,000 jobs done with nobody reading the log",
            lambda: state_counts(db, migrated_schema) == {"succeeded": 10_000},
            180,
        )
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: read.extend(iter(proc.stderr.readline, b"")), daemon=True)
        reader.start()  # the sink takes lines again: the writer says what it had to drop
        wait_watching_workers("the drop notice", lambda: any(b"log record(s) dropped" in line for line in read), 30)
        stop_cleanly(proc)
    notice = next(line for line in read if b"log record(s) dropped" in line)
    assert b"the log output did not keep up" in notice
    dropped = int(notice.rsplit(b";", 1)[1].split()[0])  # "...; N in all"
    per_job = [line for line in read if b"proc_tasks.record attempt 1 " in line]
    assert len(per_job) < 20_000 <= len(per_job) + dropped  # what did not fit was dropped and counted, not waited for


def test_a_stuck_log_sink_does_not_hold_the_exit(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection
) -> None:
    tasks.record.delay_many([(n,) for n in range(3000)])
    env = taskpg_env(pg_dsn, migrated_schema)
    with taskpg_command(*WORKER, "-l", "info", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_watching_workers("the jobs done", lambda: state_counts(db, migrated_schema) == {"succeeded": 3000}, 120)
        stop_cleanly(proc)  # the lines still queued get 2 s, then the worker exits anyway


def test_the_log_writer_counts_and_reports_what_a_blocked_sink_missed() -> None:
    """In-process: the handler never waits, whatever the sink does; what could not be queued is counted."""
    code = """
import logging, os, sys, threading, time
from taskpg import logs
r, w = os.pipe()
sink = os.fdopen(w, "w")
handler = logs.configure("info", "text", stream=sink)
log = logging.getLogger("taskpg.test")
started = time.monotonic()
for n in range(logs.QUEUE_SIZE * 3):
    log.info("line %d %s", n, "x" * 100)
took = time.monotonic() - started
assert handler.dropped > 0, handler.dropped
print(handler.dropped, round(took, 1))
sys.stdout.flush()
os._exit(0)
"""
    env = {**os.environ, "PYTHONPATH": str(TASKPG_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    dropped, _ = result.stdout.split()
    assert int(dropped) >= logs.QUEUE_SIZE  # 3x the queue emitted; only the queue and the pipe's ~64 KiB held


def test_bad_log_settings_are_refused(cli: Callable[..., Any], migrated_schema: str) -> None:
    with pytest.raises(SystemExit):
        cli(migrated_schema, "status", "-l", "loud")
    with pytest.raises(SystemExit):
        cli(migrated_schema, "status", "--log-format", "xml")
