"""Limits checked when jobs start: rate limits over sliding windows, and queue concurrency caps.

- A **rate limit** (``rate_limit="N/period"``, optional ``rate_limit_key``; or a queue's
  ``app.queue(name, rate_limit=...)``) lets at most N jobs start in any sliding window of that
  length, across all workers. A job over the limit is put back until its slot without spending an
  attempt. The window log lives in a backend: ``RedisWindows`` (a sorted set per key, one Lua round
  trip, Redis' clock) when the app has ``redis_url``, else ``PostgresWindows`` (the ``rate_events``
  table under an advisory lock, Postgres' clock), with the same semantics.
- A **queue concurrency cap** (``app.queue(name, concurrency=N)``) bounds the jobs of a queue
  running at once; it is applied when claiming (``Store.claim_capped``).

Throttles and unique jobs, checked at enqueue, are in ``guards.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .connections import redis_client
from .guards import render_key

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping, Sequence

    import redis

    from .rates import Rate
    from .store import Store
    from .task import Task

#: Every rate-limit window is longer than asked by 2 %, and by at least 0.1 s: a start is recorded a
#: moment before the task runs, and the margin keeps the task's own start times inside the limit too
#: (the delay between grant and call is absolute, up to tens of ms on a busy host).
RATE_MARGIN = 0.02
RATE_MARGIN_MIN_SECONDS = 0.1


@dataclass(frozen=True)
class QueueOptions:
    """Limits that apply to every job of one queue, across all workers."""

    name: str
    rate_limit: Rate | None = None
    concurrency: int | None = None


def window_seconds(rate: Rate) -> float:
    """The window a rate is enforced over: its period plus the safety margin."""
    return rate.seconds + max(rate.seconds * RATE_MARGIN, RATE_MARGIN_MIN_SECONDS)


@dataclass(frozen=True)
class Grant:
    """A window backend's answer: a start granted (with a token to give it back), or the wait."""

    token: Any = None
    wait: float = 0.0

    @property
    def granted(self) -> bool:
        return self.wait <= 0


class WindowBackend(Protocol):
    """Where the sliding-window logs live."""

    def take(self, key: str, count: int, window: float) -> Grant: ...

    def release(self, key: str, token: Any) -> None: ...


# KEYS: the key's sorted set. ARGV: window seconds, count, member. Redis' own clock.
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


class RedisWindows:
    """Window logs as Redis sorted sets (one member per start)."""

    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(_REDIS_TAKE)

    def take(self, key: str, count: int, window: float) -> Grant:
        member = uuid.uuid4().hex
        wait = float(self._take(keys=[self.prefix + key], args=[window, count, member]))
        return Grant(member) if wait <= 0 else Grant(wait=wait + 0.001)

    def release(self, key: str, token: Any) -> None:
        self.client.zrem(self.prefix + key, token)


class PostgresWindows:
    """Window logs as rows of ``rate_events``, one short transaction per decision."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def take(self, key: str, count: int, window: float) -> Grant:
        decision = self.store.rate_take(self.prefix + key, count, window)
        if decision.granted_at is not None:
            return Grant(decision.granted_at)
        return Grant(wait=max(decision.wait, 0.0) + 0.001)

    def release(self, key: str, token: dt.datetime) -> None:
        self.store.rate_release(self.prefix + key, token)


class RateLimiter:
    """Decides whether a job may start now; the answer is 0 or the seconds to wait."""

    def __init__(self, backend: WindowBackend, queues: Mapping[str, QueueOptions]) -> None:
        self.backend = backend
        self.queues = queues

    @classmethod
    def build(cls, store: Store, queues: Mapping[str, QueueOptions], redis_url: str | None) -> RateLimiter:
        """The limiter of one app: windows in Redis when it has ``redis_url``, else in Postgres."""
        prefix = f"taskpg:{store.schema}:rate:"
        backend: WindowBackend
        backend = PostgresWindows(store, prefix) if redis_url is None else RedisWindows(redis_client(redis_url), prefix)
        return cls(backend, queues)

    def applies_to(self, task: Task[Any, Any] | None, queue: str) -> bool:
        """Whether starting a job of this task in this queue needs a decision (a task or queue limit)."""
        if task is not None and task.options.rate_limit is not None:
            return True
        options = self.queues.get(queue)
        return options is not None and options.rate_limit is not None

    def admit(self, task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any], queue: str) -> float:
        """Seconds the job must wait for its task's and its queue's rate limits (0 = start now).

        A start granted by the task's limit is given back when the queue's limit holds the job.
        """
        options = task.options
        limits: list[tuple[str, Rate]] = []
        if options.rate_limit is not None:
            key = task.name
            if options.rate_limit_key is not None:
                key += ":" + render_key(
                    options.rate_limit_key, task.name, task.fn, options.bind, args, kwargs, "rate_limit_key"
                )
            limits.append((key, options.rate_limit))
        queue_options = self.queues.get(queue)
        if queue_options is not None and queue_options.rate_limit is not None:
            limits.append((f"queue:{queue}", queue_options.rate_limit))
        granted: list[tuple[str, Any]] = []
        for key, rate in limits:
            grant = self.backend.take(key, rate.count, window_seconds(rate))
            if not grant.granted:
                for taken_key, token in granted:
                    self.backend.release(taken_key, token)
                return grant.wait
            granted.append((key, grant.token))
        return 0.0
