"""Dead jobs: list them, bring them back, purge them. Nothing is deleted unless asked."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from . import codec
from .broker import Database
from .enqueue import NewJob, insert_job
from .exceptions import ConfigurationError
from .job import new_job_id
from .ops import inspect_job, validate_job_id

if TYPE_CHECKING:
    from .task import Task

logger = logging.getLogger("taskpg.worker")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigurationError(f"{text!r} is not a duration: use e.g. 3600, 30m, 24h or 7d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class DeadJob:
    id: str
    task: str
    queue: str
    attempts: int
    died_at: dt.datetime | None
    error_type: str | None
    error_message: str | None


def list_dead(db: Database, queue: str | None = None, task: str | None = None, limit: int = 100) -> list[DeadJob]:
    """Dead jobs, newest first, with the last error of each."""
    with db.connection() as conn:
        rows = conn.execute(db.queries.dead_list, {"queue": queue, "task": task, "limit": limit}).fetchall()
    return [DeadJob(*row) for row in rows]


def retry_dead(db: Database, ids: list[str] | None = None, queue: str | None = None, task: str | None = None) -> int:
    """Make dead jobs available again with fresh attempts (their error history is kept).

    ``ids=None`` means every dead job matching ``queue``/``task``. Returns how many came back.
    """
    ids = None if ids is None else [validate_job_id(i) for i in ids]
    params = {"ids": ids, "queue": queue, "task": task, "channel": db.queries.jobs_channel}
    with db.connection() as conn:
        row = conn.execute(db.queries.dead_retry, params).fetchone()
    return int(row[0]) if row else 0


def purge_dead(db: Database, older_than: float, queue: str | None = None, task: str | None = None) -> int:
    """Delete dead jobs that died more than ``older_than`` seconds ago; returns how many."""
    with db.connection() as conn:
        return conn.execute(db.queries.dead_purge, {"older_than": older_than, "queue": queue, "task": task}).rowcount


def route_dead_letter(
    db: Database, conn: psycopg.Connection[Any], job_id: str, tasks: Mapping[str, Task[Any, Any]]
) -> None:
    """Send a job that just died to its task's ``dead_letter``: a handler task, or a queue.

    Runs in the transaction that made the job dead. A job already in its dead-letter queue is not
    routed again (a failing copy would otherwise copy itself for ever).
    """
    job = inspect_job(db, job_id, conn)
    task = tasks.get(job["task"]) if job else None
    target = task.options.dead_letter if task is not None else None
    if job is None or target is None or job["queue"] == target:
        return
    new_id = new_job_id()
    handler = tasks.get(target)
    if handler is not None:  # a handler task receives the dead job, its error history included
        dead_job = {key: job[key] for key in ("id", "task", "queue", "args", "kwargs", "errors")}
        args_json, kwargs_json = codec.encode_arguments(handler.name, (), {"job": dead_job}, 2**31)
        options = handler.options
        new = NewJob(
            new_id, handler.name, options.queue, args_json, kwargs_json, options.priority, options.max_attempts
        )
        insert_job(db, new, conn)
    else:  # a dead-letter queue receives a copy of the job with its history
        conn.execute(
            db.queries.copy_to_queue,
            {"id": job_id, "new_id": new_id, "queue": target, "channel": db.queries.jobs_channel},
        )
    logger.warning("job %s %s is dead; routed to dead_letter %r as job %s", job_id, job["task"], target, new_id)
