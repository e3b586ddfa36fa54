"""Tasks with middleware and signal receivers, for worker processes (``taskpg worker -A hook_tasks``).

The middleware wraps each result as ``{"result": ..., "pid": <the process that ran it>}``; the
``worker_process_init`` receiver writes the pid of each child process that started into
``<schema>.child_starts``. The test creates that table (and the app comes from TASKPG_DSN / TASKPG_SCHEMA).
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg import sql

from taskpg import TaskPG, signals


def stamp(call_next: Any, request: Any) -> Any:
    return {"result": call_next(request), "pid": os.getpid(), "seen": request.task}


async def stamp_async(call_next: Any, request: Any) -> Any:
    return {"result": await call_next(request), "pid": os.getpid(), "seen": request.task}


app = TaskPG(os.environ.get("TASKPG_DSN"), schema=os.environ.get("TASKPG_SCHEMA"), middleware=[stamp, stamp_async])


@app.task
def double(x: int) -> int:
    return 2 * x


@app.task
async def triple(x: int) -> int:
    return 3 * x


@signals.worker_process_init.connect
def child_started(sender: Any = None, **kwargs: Any) -> None:
    with psycopg.connect(app.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (pid) VALUES (%s)").format(sql.Identifier(app.schema, "child_starts")),
            (os.getpid(),),
        )
