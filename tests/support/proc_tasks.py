"""Tasks for the worker processes the tests start (``taskpg worker -A proc_tasks``; see processes.py).

The app comes from TASKPG_DSN / TASKPG_SCHEMA. Every task first records its execution in
``<schema>.executions`` (job id, n, pid of the process that ran it), so a test can tell from the
database which jobs ran, how often and where. The ``tasks`` fixture (conftest.py) creates that table.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from taskpg import SoftTimeLimitExceeded, TaskPG

# os.environ.get: the test process imports this module too, only to read the task definitions.
app = TaskPG(os.environ.get("TASKPG_DSN"), schema=os.environ.get("TASKPG_SCHEMA"))

_local = threading.local()


def _record_execution(task: Any, n: int) -> None:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(app.dsn, autocommit=True)
    conn.execute(
        sql.SQL("INSERT INTO {} (job_id, n, pid) VALUES (%s, %s, %s)").format(sql.Identifier(app.schema, "executions")),
        (task.request.id, n, os.getpid()),
    )


@app.task(bind=True)
def record(self: Any, n: int) -> int:
    _record_execution(self, n)
    return n


@app.task(bind=True)
def sleepy(self: Any, seconds: float, n: int) -> int:
    _record_execution(self, n)
    time.sleep(seconds)
    return n


@app.task(bind=True)
def fail(self: Any, n: int) -> None:
    _record_execution(self, n)
    raise ValueError(f"fail {n}")


@app.task(bind=True, time_limit=1, max_retries=0)
def hang(self: Any, n: int) -> None:
    _record_execution(self, n)
    time.sleep(30)


@app.task(bind=True, soft_time_limit=0.5, time_limit=5, max_retries=0)
def soft(self: Any, n: int) -> str:
    _record_execution(self, n)
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft"
    return "not interrupted"


@app.task(bind=True, max_retries=0)
def once(self: Any, seconds: float, n: int) -> int:
    """sleepy without retries: one attempt only."""
    _record_execution(self, n)
    time.sleep(seconds)
    return n


@app.task(bind=True, retry_backoff=0.1, retry_jitter=False)
def poison(self: Any, n: int) -> None:
    """Kills the process that runs it (as a segfault in C code or the OOM killer would)."""
    _record_execution(self, n)
    time.sleep(0.05)
    os._exit(70)


@app.task(bind=True)
def chatty(self: Any, n: int) -> int:
    """Logs through a logger that is not taskpg's, as a library the task uses would."""
    _record_execution(self, n)
    library = logging.getLogger("thirdparty.lib")
    library.info("third-party info %d", n)
    library.warning("third-party warning %d", n)
    return n


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.05, retry_jitter=False)
def unreachable(self: Any, n: int) -> None:
    """Always fails with an error it retries: three attempts, then dead."""
    _record_execution(self, n)
    raise ConnectionError(f"unreachable {n}")


@app.task(bind=True)
def total(self: Any, numbers: list[int]) -> int:
    """A chord's body: records one execution with the sum of its members' results."""
    _record_execution(self, sum(numbers))
    return sum(numbers)
