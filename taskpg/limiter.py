"""Limits checked when jobs start: rate limits (GCRA, reserved starts), and queue concurrency caps.

- A **rate limit** (``rate_limit="N/period"``, optional ``rate_limit_key``; or a queue's
  ``app.queue(name, rate_limit=...)``) spaces the starts of its jobs at least ``period / N`` apart,
  across all workers, so that any window of that length holds at most N. A job whose start is later
  is put back until then, its start reserved, without spending an attempt. The state lives in a
  backend: ``RedisRates`` (one key, one Lua round trip, Redis' clock) when the app has ``redis_url``,
  else ``PostgresRates`` (one row of ``rate_limits``, one upsert, Postgres' clock).
- A **queue concurrency cap** (``app.queue(name, concurrency=N)``) bounds the jobs of a queue
  running at once; it is applied when claiming (``Store.claim_capped``).

Throttles and unique jobs, checked at enqueue, are in ``guards.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .connections import redis_client
from .guards import render_key
from .options import validate_key
from .store import RateSlot

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import redis

    from .rates import Rate
    from .store import Store
    from .task import Task

#: Every rate-limit window is enforced longer than asked by 2 %, and by at least 0.04 s: a job starts a
#: little after the start reserved for it, and the margin keeps the task's own start times inside the
#: limit too. TOLERANCE of it is how late a job may begin at its reserved start (busy runners, a slow
#: promotion: tens of ms on a loaded host); the rest covers the step from there to the task's first line
#: (well under 1 ms on an idle host, a few ms on a loaded one).
RATE_MARGIN = 0.02
RATE_MARGIN_MIN_SECONDS = 0.04
TOLERANCE = 0.75


@dataclass(frozen=True)
class QueueOptions:
    """Limits that apply to every job of one queue, across all workers."""

    name: str
    rate_limit: Rate | None = None
    concurrency: int | None = None


def window_seconds(rate: Rate) -> float:
    """The window a rate is enforced over: its period plus the safety margin."""
    return rate.seconds + max(rate.seconds * RATE_MARGIN, RATE_MARGIN_MIN_SECONDS)


def tolerance_seconds(rate: Rate) -> float:
    """How late a job may start after the start reserved for it and keep ``rate``: 3/4 of the margin.

    Two starts N apart are reserved a window apart; if the earlier is late by more than the margin
    (window - period), both fall into one period with the N - 1 between them. A quarter of it is kept
    for the moment between the check and the task's first line.
    """
    return (window_seconds(rate) - rate.seconds) * TOLERANCE


def interval_seconds(rate: Rate) -> float:
    """How far apart the starts under ``rate`` are: N per window, spaced evenly."""
    return window_seconds(rate) / rate.count


class RateBackend(Protocol):
    """Where the limiter keys' state lives."""

    def reserve(self, key: str, interval: float) -> RateSlot:
        """Reserve the next start of ``key`` (starts ``interval`` seconds apart)."""
        ...


# KEYS: the key. ARGV: interval seconds. GCRA on Redis' clock: the value is the key's theoretical
# arrival time (the earliest next start); a reservation takes max(tat, now) and moves tat past it.
_REDIS_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local start = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local tat = start + interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return {string.format('%.6f', start - now), string.format('%.6f', start)}
"""


class RedisRates:
    """GCRA state in Redis: one string per key, one Lua round trip per decision."""

    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.prefix = prefix
        self._reserve = client.register_script(_REDIS_RESERVE)

    def reserve(self, key: str, interval: float) -> RateSlot:
        wait, at = self._reserve(keys=[self.prefix + key], args=[interval])
        return RateSlot(max(0.0, float(wait)), float(at))


class PostgresRates:
    """GCRA state in the rate_limits table: one row per key, one upsert per decision."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def reserve(self, key: str, interval: float) -> RateSlot:
        return self.store.rate_reserve(self.prefix + key, interval)


class RateLimiter:
    """Decides when a job may start: it reserves the job's start under each limit that applies.

    GCRA without bursts: the starts under ``N/period`` are spaced evenly, at least ``window / N``
    apart, so any window of the period holds at most N of them (as Celery's rate limits space tasks).
    A job whose start is in the future is put back until then, with that start reserved for it
    (``jobs.rate_slot``): it is not asked again, so a full limiter costs each job one put-back, not
    one per look. Constant work per decision, in Redis or in Postgres.
    """

    def __init__(self, backend: RateBackend, queues: Mapping[str, QueueOptions]) -> None:
        self.backend = backend
        self.queues = queues

    @classmethod
    def build(cls, store: Store, queues: Mapping[str, QueueOptions], redis_url: str | None) -> RateLimiter:
        """The limiter of one app: state in Redis when it has ``redis_url``, else in Postgres."""
        prefix = f"taskpg:{store.schema}:rate:"
        backend: RateBackend
        backend = PostgresRates(store, prefix) if redis_url is None else RedisRates(redis_client(redis_url), prefix)
        return cls(backend, queues)

    def rates_of(self, task: Task[Any, Any] | None, queue: str) -> list[Rate]:
        """The limits a job of this task in this queue starts under: its task's, then its queue's."""
        rates = [] if task is None or task.options.rate_limit is None else [task.options.rate_limit]
        options = self.queues.get(queue)
        if options is not None and options.rate_limit is not None:
            rates.append(options.rate_limit)
        return rates

    def applies_to(self, task: Task[Any, Any] | None, queue: str) -> bool:
        """Whether starting a job of this task in this queue needs a decision (a task or queue limit).
        Asked for every job a worker starts: no list built, as rates_of does."""
        if task is not None and task.options.rate_limit is not None:
            return True
        options = self.queues.get(queue)
        return options is not None and options.rate_limit is not None

    def tolerance(self, task: Task[Any, Any], queue: str) -> float:
        """How late a job may start after its reserved start (the strictest of its limits)."""
        return min(tolerance_seconds(rate) for rate in self.rates_of(task, queue))

    def admit(
        self, task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any], queue: str
    ) -> RateSlot | None:
        """Reserve the job's start under its task's and its queue's limits; returns the later of the two
        starts (None: no limit applies)."""
        options = task.options
        limits: list[tuple[str, Rate]] = []
        if options.rate_limit is not None:
            key = task.name
            if options.rate_limit_key is not None:
                key += ":" + render_key(
                    options.rate_limit_key, task.name, task.fn, options.bind, args, kwargs, "rate_limit_key"
                )
            limits.append((validate_key(key, f"task {task.name!r}: rate_limit_key"), options.rate_limit))
        queue_options = self.queues.get(queue)
        if queue_options is not None and queue_options.rate_limit is not None:
            limits.append((f"queue:{queue}", queue_options.rate_limit))
        slots = [self.backend.reserve(key, interval_seconds(rate)) for key, rate in limits]
        return max(slots, key=lambda slot: slot.wait, default=None)
