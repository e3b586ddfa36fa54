"""Throttles at enqueue, unique jobs, rate limits at execution, queue concurrency caps.

- A **throttle** (``throttle_key`` + ``throttle="N/period"``) admits at most N jobs per key per
  fixed window (windows aligned to the epoch). An extra call writes nothing (``drop``, the
  default) or is scheduled into the first window with room (``defer``).
- A **unique** job (``unique_key``) has no twin: while an unfinished job holds the key (default),
  or for ``unique_for`` seconds after the first enqueue, an enqueue returns the holder's handle.
- A **rate limit** (``rate_limit="N/period"``, optional ``rate_limit_key``) lets at most N jobs start
  in any sliding window of that length, across all workers; a job over the limit is put back
  until its slot without spending an attempt. With Redis (``redis_url``) the window lives in a
  sorted set per key; without, in Postgres, with the same semantics.
- A **queue** can carry a rate limit and a global concurrency cap (``app.queue(...)``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import re
import string
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from . import codec
from .broker import Database, connect
from .exceptions import ConfigurationError
from .throttle import Rate

if TYPE_CHECKING:
    from .task import Task

#: Every rate-limit window is longer than asked by 2 %, and by at least 0.1 s: a start is recorded a
#: moment before the task runs, and the margin keeps the task's own start times inside the limit too
#: (the delay between grant and call is absolute, up to tens of ms on a busy host).
RATE_MARGIN = 0.02
RATE_MARGIN_MIN_SECONDS = 0.1
#: Most windows a deferred throttled call looks ahead for room.
DEFER_WINDOWS = 1000


def render_key(
    template: str | Callable[..., str],
    task: Task[Any, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    option: str,
) -> str:
    """A throttle/unique/rate-limit key from the call's arguments (format string or callable)."""
    if callable(template):
        return str(template(*args, **kwargs))
    try:
        bound = inspect.signature(task.fn).bind(*([None] if task.options.bind else []), *args, **kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"task {task.name!r}: arguments do not fit its signature: {exc}") from exc
    bound.apply_defaults()
    try:
        return template.format(**bound.arguments)
    except (KeyError, IndexError, AttributeError) as exc:
        raise ConfigurationError(f"task {task.name!r}: {option}={template!r} names {exc}, not an argument") from exc


def check_key_templates(task: Task[Any, Any]) -> None:
    """Fail at declaration when a key format string names something that is not an argument."""
    try:
        signature = inspect.signature(task.fn)
    except (TypeError, ValueError):
        return
    parameters = list(signature.parameters.values())[1 if task.options.bind else 0 :]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # **kwargs: any name may be an argument
    names = {p.name for p in parameters}
    for option in ("throttle_key", "unique_key", "rate_limit_key"):
        template = getattr(task.options, option)
        if not isinstance(template, str):
            continue
        for _, field, _, _ in string.Formatter().parse(template):
            root = re.split(r"[.\[]", field, maxsplit=1)[0] if field else ""
            if root and root not in names:
                raise ConfigurationError(
                    f"task {task.name!r}: {option}={template!r} names {root!r}, which is not one of its arguments "
                    f"({', '.join(sorted(names)) or 'none'})"
                )


def unique_key_for(task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """The job's unique key: ``task:<rendered key>``, or a hash of the arguments for ``unique_key=True``."""
    option = task.options.unique_key
    if option is None:
        return None
    if option is True:
        digest = hashlib.sha256(codec.dumps([list(args), dict(sorted(kwargs.items()))]).encode()).hexdigest()
        return f"{task.name}:{digest[:32]}"
    return f"{task.name}:{render_key(option, task, args, kwargs, 'unique_key')}"


@dataclass(frozen=True)
class Throttle:
    key: str
    rate: Rate
    defer: bool


DROPPED = "dropped"


def admit_throttle(
    db: Database, conn: psycopg.Connection[Any], task: str, throttle: Throttle
) -> dt.datetime | str | None:
    """Take a place in the throttle window: None = run as asked, a datetime = run then (deferred),
    ``DROPPED`` = turned away. Call inside the enqueue's transaction."""
    params = {"task": task, "key": throttle.key, "period": throttle.rate.seconds, "limit": throttle.rate.count}
    for ahead in range(DEFER_WINDOWS if throttle.defer else 1):
        row = conn.execute(db.queries.throttle_admit, {**params, "ahead": ahead}).fetchone()
        if row is not None:
            window_start, in_future = row
            return window_start if in_future else None
    conn.execute(db.queries.throttle_rejected, params)
    return DROPPED


def take_unique_lock(db: Database, conn: psycopg.Connection[Any], key: str, job_id: str, seconds: float) -> str:
    """``unique_for``: the id of the job that holds the key (``job_id`` itself when it got it)."""
    row = conn.execute(db.queries.take_unique_lock, {"key": key, "job_id": job_id, "seconds": seconds}).fetchone()
    assert row is not None
    return str(row[0])


def active_unique(db: Database, conn: psycopg.Connection[Any], keys: Sequence[str]) -> dict[str, str]:
    """unique key -> id of the unfinished job holding it."""
    rows = conn.execute(db.queries.active_unique, {"keys": list(keys)}).fetchall()
    return {key: job_id for key, job_id in rows}


# -- execution-time limits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueOptions:
    """Limits that apply to every job of one queue, across all workers."""

    name: str
    rate_limit: Rate | None = None
    concurrency: int | None = None


_REDIS_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


class RateLimiter:
    """Decides whether a job may start now; the answer is 0 or the seconds to wait.

    Uses Redis when the app has ``redis_url`` (one round trip, a Lua script over a sorted set),
    else Postgres (an advisory lock on the key and a log table, one short transaction).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.db: Database = app.db
        self.prefix = f"taskpg:{app.schema}:rate:"
        self._local = threading.local()
        self._redis_take: Any = None
        if app.redis_url is not None:
            from .buffer import redis_client

            self._redis = redis_client(app.redis_url)
            self._redis_take = self._redis.register_script(_REDIS_TAKE)

    def take(self, key: str, rate: Rate) -> tuple[float, Any]:
        """Try to take a start under ``rate`` for ``key``: (0, token) when granted, else (seconds to wait, None)."""
        window = rate.seconds + max(rate.seconds * RATE_MARGIN, RATE_MARGIN_MIN_SECONDS)
        if self._redis_take is not None:
            member = uuid.uuid4().hex
            wait = float(self._redis_take(keys=[self.prefix + key], args=[window, rate.count, member]))
            return (0.0, member) if wait <= 0 else (wait + 0.001, None)
        granted_at, wait = self._postgres_take(key, rate.count, window)
        return (0.0, granted_at) if granted_at is not None else (max(wait, 0.0) + 0.001, None)

    def release(self, key: str, token: Any) -> None:
        """Give back a start granted by ``take``."""
        if self._redis_take is not None:
            self._redis.zrem(self.prefix + key, token)
        else:
            self._pg().execute(self.db.queries.rate_release, {"key": self.prefix + key, "at": token})

    def _pg(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.db.dsn)
        return conn

    def _postgres_take(self, key: str, limit: int, window: float) -> tuple[Any, float]:
        conn = self._pg()
        q = self.db.queries
        try:
            with conn.transaction():
                conn.execute(q.advisory_xact_lock, {"name": self.prefix + key})
                row = conn.execute(q.rate_take, {"key": self.prefix + key, "limit": limit, "window": window}).fetchone()
        except psycopg.OperationalError:
            conn.close()
            raise
        assert row is not None
        granted_at, wait = row
        return granted_at, float(wait or 0.0)

    def admit(self, task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any], queue: str) -> float:
        """Seconds the job must wait for its task's and its queue's rate limits (0 = start now).

        A start granted by the task's limit is given back when the queue's limit holds the job.
        """
        options = task.options
        limits: list[tuple[str, Rate]] = []
        if options.rate_limit is not None:
            key = task.name
            if options.rate_limit_key is not None:
                key += ":" + render_key(options.rate_limit_key, task, args, kwargs, "rate_limit_key")
            limits.append((key, options.rate_limit))
        queue_options = self.app.queues.get(queue)
        if queue_options is not None and queue_options.rate_limit is not None:
            limits.append((f"queue:{queue}", queue_options.rate_limit))
        granted: list[tuple[str, Any]] = []
        for key, rate in limits:
            wait, token = self.take(key, rate)
            if wait > 0:
                for taken_key, taken in granted:
                    self.release(taken_key, taken)
                return wait
            granted.append((key, token))
        return 0.0


def claim_capped(
    db: Database, conn: psycopg.Connection[Any], queue: QueueOptions, limit: int, worker_id: str
) -> tuple[list[Any], bool]:
    """Claim from a queue with a global concurrency cap: under the queue's advisory lock, count
    its running jobs and claim only what the cap leaves. Also says whether the cap was the limit
    (then jobs finishing anywhere free room, which no NOTIFY announces)."""
    assert queue.concurrency is not None
    q = db.queries
    with conn.transaction():
        conn.execute(q.advisory_xact_lock, {"name": f"taskpg:{db.queries.schema}:queue:{queue.name}"})
        row = conn.execute(q.running_in_queue, {"queue": queue.name}).fetchone()
        room = queue.concurrency - int(row[0] if row else 0)
        if room <= 0:
            return [], True
        rows = conn.execute(
            q.claim_jobs, {"queues": [queue.name], "limit": min(limit, room), "worker_id": worker_id}
        ).fetchall()
        return rows, room <= limit
