"""A task for worker processes whose own database may misbehave (read-only, restarted...): it records
each run in a ledger table on another server, LEDGER_DSN / LEDGER_TABLE, so a run is counted whatever
the jobs' database does."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from taskpg import TaskPG

app = TaskPG(os.environ.get("TASKPG_DSN"), schema=os.environ.get("TASKPG_SCHEMA"))
_local = threading.local()


@app.task(bind=True)
def sleepy(self: Any, seconds: float, n: int) -> int:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["LEDGER_DSN"], autocommit=True)
    schema, table = os.environ["LEDGER_TABLE"].split(".")
    conn.execute(
        sql.SQL("INSERT INTO {} (job_id, n, pid) VALUES (%s, %s, %s)").format(sql.Identifier(schema, table)),
        (self.request.id, n, os.getpid()),
    )
    time.sleep(seconds)
    return n
