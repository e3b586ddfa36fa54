"""The producer side of the Redis spike buffer: one RPUSH per job (a pipeline for many).

If Redis cannot be reached the job is written to Postgres directly instead, so a request never
loses a job because Redis is down; the first fallback of an outage is logged, every one is counted
in ``BufferProducer.fallbacks``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from . import codec, envelope
from .connections import redis_client, redis_errors
from .enqueue import insert_job, insert_staged

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .guards import Guard
    from .job import NewJob
    from .store import Store

logger = logging.getLogger("taskpg.buffer")

PUSH_CHUNK = 10_000  # envelopes per RPUSH command in a pipeline
#: How long a buffered unique job's key is held in Redis when the task has no ``unique_for``. Past
#: it, Postgres' unique index still drops a twin at flush time (see docs/buffer.md).
BUFFER_UNIQUE_TTL = 60

# KEYS: buffer list, unique key. ARGV: envelope, ttl seconds, job id. Push unless the key is held;
# returns the id of the job holding the key.
_PUSH_UNIQUE = """
local holder = redis.call('GET', KEYS[2])
if holder then return holder end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
return ARGV[3]
"""


def buffer_key(schema: str) -> str:
    """The default Redis list that holds envelopes waiting for the flusher."""
    return f"taskpg:{schema}:buffer"


class BufferProducer:
    """Pushes jobs onto the buffer's first list, falling back to a direct insert when Redis is down."""

    def __init__(self, store: Store, url: str, lists: Sequence[str] = ()) -> None:
        self.store = store
        self.lists = tuple(lists) or (buffer_key(store.schema),)
        self.key = self.lists[0]  # where this producer pushes
        self.unique_prefix = f"{buffer_key(store.schema)}:unique:"
        self.client = redis_client(url)
        self._push_unique = self.client.register_script(_PUSH_UNIQUE)
        self.fallbacks = 0  # jobs written straight to Postgres because Redis failed, since start
        self._outage = False
        self._outage_started_at = 0
        self._lock = threading.Lock()

    def push(
        self, job: NewJob, unique_key: str | None = None, unique_for: float | None = None, guard: Guard | None = None
    ) -> str | None:
        """Push one job; returns its id, or the id of the buffered twin holding ``unique_key``
        (held in Redis for ``unique_for`` seconds, else BUFFER_UNIQUE_TTL)."""
        try:
            if unique_key is None:
                self.client.rpush(self.key, envelope.encode(job))
                holder: str | None = job.id
            else:
                ttl = int(unique_for or BUFFER_UNIQUE_TTL)
                pushed = self._push_unique(
                    keys=[self.key, self.unique_prefix + unique_key], args=[envelope.encode(job), ttl, job.id]
                )
                holder = pushed.decode() if isinstance(pushed, bytes) else str(pushed)
        except redis_errors() as exc:
            self._fell_back(exc, 1)
            return insert_job(self.store, job, guard)  # with the same unique/throttle checks
        self._recovered()
        return holder

    def push_many(self, jobs: Iterable[NewJob]) -> None:
        batch = list(jobs)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for start in range(0, len(batch), PUSH_CHUNK):
                    pipe.rpush(self.key, *envelope.encode_many(batch[start : start + PUSH_CHUNK]))
                pipe.execute()
        except redis_errors() as exc:
            # A pipeline that failed part-way may have pushed some chunks already. Write them all
            # directly, idempotently by job id: whichever of this write and the flusher's comes
            # second skips the jobs the other one wrote.
            self._fell_back(exc, len(batch))
            insert_staged(self.store, batch)
            return
        self._recovered()

    def _fell_back(self, exc: Exception, count: int) -> None:
        with self._lock:
            self.fallbacks += count
            first = not self._outage
            self._outage = True
            if first:
                self._outage_started_at = self.fallbacks - count
        if first:
            logger.error("Redis is unreachable (%s): writing jobs straight to Postgres until it is back", exc)

    def _recovered(self) -> None:
        if self._outage:
            with self._lock:
                self._outage = False
            logger.warning(
                "Redis is reachable again: buffering resumed after %d direct write(s)",
                self.fallbacks - self._outage_started_at,
            )

    def depth(self) -> tuple[int, str | None]:
        """How many envelopes wait in the buffer's lists, and when the oldest of their first envelopes
        was pushed (its ``enqueued_at``; envelopes of other producers may carry none)."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.lists:
                pipe.llen(key)
                pipe.lindex(key, 0)
            replies = pipe.execute()
        lengths, heads = replies[0::2], replies[1::2]
        stamps = [_enqueued_at(head) for head in heads if head is not None]
        return sum(int(n) for n in lengths), min((s for s in stamps if s), default=None)


def _enqueued_at(raw: bytes) -> str | None:
    try:
        value = codec.loads(raw).get("enqueued_at")
    except Exception:
        return None
    return value if isinstance(value, str) else None
