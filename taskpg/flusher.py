"""The flusher: moves envelopes from the Redis buffer into Postgres in bulk, losing and doubling nothing.

One flush, step by step:

1. A Lua script moves up to ``batch_size`` envelopes from the buffer list to this flusher's own
   processing list, atomically (the plain LRANGE + LTRIM recipe loses the batch if the process
   dies between the two).
2. The envelopes are decoded (bad ones become dead jobs that keep the raw payload) and written
   with COPY into a staging table, then ``INSERT ... ON CONFLICT (id) DO NOTHING``, in one
   transaction.
3. Only after that commit is the processing list deleted.

Killed after 1 or during 2: the processing list survives; the next flusher to take the lock
recovers it. Killed after the commit but before 3: the recovered batch is written again and the
conflict on job ids makes that a no-op. Postgres down during 2: the batch stays in the processing
list and the write is retried with backoff. Only one flusher runs per buffer at a time (a Redis
lock with a TTL, renewed while it works). In a worker or a beat the flusher is a background loop
(``start()``/``stop()``); ``taskpg flush`` calls ``drain()``.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import durability, envelope, events
from .connections import needs_reconnect, reconnecting, redis_client, redis_errors, refuses_value
from .enqueue import insert_staged
from .events import JobEvent
from .exceptions import DatabaseUnavailable
from .job import NewJob
from .loops import BackgroundLoop

if TYPE_CHECKING:
    from .parts import AppParts

logger = logging.getLogger("taskpg.flusher")

# KEYS: buffer, processing list, registry of processing lists. ARGV: how many to move, separator.
# Returns the count and the envelopes joined by the separator: one reply to read, not one per envelope.
# Idempotent: the processing list is new for each batch (its id chosen by the flusher), so a move sent
# again by the client after a lost reply (retry_on_timeout) finds it and returns the same batch instead
# of appending the next one to it (which the flusher would then delete unwritten).
_MOVE_BATCH = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  local moved = redis.call('LRANGE', KEYS[2], 0, -1)
  return {#moved, table.concat(moved, ARGV[2])}
end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  for i = 1, #items, 5000 do
    redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 4999, #items)))
  end
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('SADD', KEYS[3], KEYS[2])
end
return {#items, table.concat(items, ARGV[2])}
"""

# KEYS: lock. ARGV: owner token, ttl ms. Renew only a lock we still own.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Step = Callable[[str], None]

#: Joins a batch's envelopes into Redis' one reply (ASCII RS: JSON text never holds it raw; a batch
#: where an envelope does is read again as a list).
SEPARATOR = b"\x1e"


@dataclass(frozen=True)
class Batch:
    """The envelopes of one processing list, joined by SEPARATOR."""

    key: str
    count: int
    blob: bytes

    @classmethod
    def of(cls, key: str, items: list[bytes]) -> Batch:
        return cls(key, len(items), SEPARATOR.join(items))

    @property
    def splits(self) -> bool:
        """Whether splitting the blob gives back the envelopes (no envelope holds a separator)."""
        return self.count > 0 and self.blob.count(SEPARATOR) == self.count - 1


#: Seconds between the loop's looks at the buffer (a full batch is flushed without waiting for ``interval``).
LOOK_EVERY = 0.05


class Flusher(BackgroundLoop):
    """Moves buffered envelopes into Postgres; see the module docstring for the guarantees."""

    def __init__(
        self,
        app: AppParts,
        batch_size: int = 50_000,
        interval: float = 1.0,
        lock_ttl: float = 30.0,
        on_step: Step | None = None,
    ) -> None:
        if app.redis_url is None:
            raise ValueError("the flusher needs an app with redis_url=")
        super().__init__("flusher", app.store)
        self.tasks = app.tasks
        self.send_events = getattr(app, "send_events", False)
        self.max_payload_bytes = app.max_payload_bytes
        self.batch_size = batch_size
        self.interval = interval
        self.lock_ttl_ms = int(lock_ttl * 1000)
        self.on_step = on_step or (lambda step: None)
        self.id = str(uuid.uuid4())
        self.redis = redis_client(app.redis_url)
        prefix = f"taskpg:{app.schema}"
        self.lists = app.buffer_lists  # the buffer's lists, flushed in turn
        self._turn = 0
        self.watch = durability.LossWatch(self.lists)
        self._checked = False  # the Redis durability check has run
        self.holding = False  # this flusher holds the buffer's lock
        self._recovered = False
        self._last = 0.0
        self.registry = f"{prefix}:processing"
        self.own_prefix = f"{prefix}:processing:{self.id}:"  # + a batch id: one list per batch
        self.lock = f"{prefix}:flusher-lock"
        self._move = self.redis.register_script(_MOVE_BATCH)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.flushed = 0

    # -- the lock ----------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the flush lock. A SET sent again after a lost reply finds the lock already ours."""
        if self.redis.set(self.lock, self.id, nx=True, px=self.lock_ttl_ms):
            return True
        return self.redis.get(self.lock) == self.id.encode()

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.lock], args=[self.id, self.lock_ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.lock], args=[self.id])

    # -- flushing ----------------------------------------------------------------------------------

    def _processing_lists(self) -> list[str]:
        return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in self.redis.smembers(self.registry))

    def recover(self) -> int:
        """Write the processing lists of flushers that died; call while holding the lock."""
        recovered = 0
        for key in self._processing_lists():
            if key.startswith(self.own_prefix):
                continue
            batch = self._read(key)
            if batch.count:
                logger.warning("recovering %d envelope(s) left by a flusher that died (%s)", batch.count, key)
                self._write(batch)
                recovered += batch.count
            self.redis.delete(key)
            self.redis.srem(self.registry, key)
        return recovered

    def flush_once(self) -> int:
        """Move one batch into Postgres; returns how many envelopes it handled.

        Each batch gets a processing list of its own; a batch that a failed write left behind is
        written again first, under the same key, so its envelopes get the same ids again.
        """
        leftovers = [key for key in self._processing_lists() if key.startswith(self.own_prefix)]
        batch = self._read(leftovers[0]) if leftovers else self._next_batch()
        if not batch.count:
            return 0
        self.on_step("moved")
        self._write(batch)
        self.on_step("committed")
        self.redis.delete(batch.key)
        self.redis.srem(self.registry, batch.key)
        self.flushed += batch.count
        return batch.count

    def _next_batch(self) -> Batch:
        """Move a batch from the next of the buffer's lists that has envelopes (each list in turn)."""
        for _ in self.lists:
            index = self._turn % len(self.lists)
            self._turn += 1
            key = f"{self.own_prefix}{uuid.uuid4()}"
            try:
                count, blob = self._move(
                    keys=[self.lists[index], key, self.registry], args=[self.batch_size, SEPARATOR]
                )
            except Exception:
                self.watch.reset()  # the move may have happened: its envelopes must not count as lost
                raise
            if int(count):
                self.watch.moved(index, int(count))
                return Batch(key, int(count), bytes(blob))
        return Batch("", 0, b"")

    def drain(self, timeout: float = 60.0) -> int:
        """Flush until the buffer is empty (what ``taskpg flush`` does); returns the count."""
        if not self._checked:
            self._say_durability()
        deadline = time.monotonic() + timeout
        while not self.acquire():
            if time.monotonic() > deadline:
                raise TimeoutError("another flusher holds the buffer's lock (a running worker or beat flushes already)")
            time.sleep(0.1)
        try:
            total = self.recover()
            while True:
                moved = self.flush_once()
                total += moved
                if not moved:
                    return total
                self.renew()
        finally:
            self.release()

    def _read(self, key: str) -> Batch:
        return Batch.of(key, self.redis.lrange(key, 0, -1))

    def _write(self, batch: Batch) -> None:
        """Write a batch in one transaction, retrying while Postgres is unreachable (for at most half
        the lock's TTL: the lock is renewed after each try)."""

        def write() -> None:
            self._write_decoded(batch)
            self.renew()

        reconnecting(
            write,
            "flushing the buffer into Postgres",
            reset=lambda: None,  # the pool replaces lost connections itself
            retry_on=lambda exc: isinstance(exc, DatabaseUnavailable) or needs_reconnect(exc),
            give_up_after=self.lock_ttl_ms / 1000 / 2,
        )

    def _write_decoded(self, batch: Batch) -> None:
        """Decode in Python (bad envelopes become dead jobs), then COPY and insert idempotently."""
        items = batch.blob.split(SEPARATOR) if batch.splits else self.redis.lrange(batch.key, 0, -1)
        jobs: list[NewJob] = []
        dead: dict[str, str] = {}
        for index, raw in enumerate(items):
            decoded = envelope.decode(
                raw, self.tasks, self.max_payload_bytes, functools.partial(_batch_id, batch.key, index)
            )
            if isinstance(decoded, envelope.Rejected):
                dead[decoded.job.id] = decoded.reason
                jobs.append(decoded.job)
                logger.warning("envelope rejected (stored as dead job %s): %s", decoded.job.id, decoded.reason)
            else:
                jobs.append(decoded)
        try:
            insert_staged(self.store, _Announced(jobs, self.on_step), dead)
        except Exception as exc:
            if not refuses_value(exc):
                raise
            logger.warning("Postgres refused a batch of %d envelope(s) (%s): isolating the bad one(s)", len(jobs), exc)
            self._isolate(list(zip(jobs, items, strict=True)), dead, exc)
        if self.send_events:
            self._tell(jobs, dead)

    def _tell(self, jobs: list[NewJob], dead: dict[str, str]) -> None:
        """``enqueued`` (or ``dead``, for a rejected envelope) for the jobs of a committed batch; a batch
        written again after a crash tells them again. A failure is logged: the jobs are written."""
        now = time.time()
        told = [JobEvent("dead" if job.id in dead else "enqueued", job.id, job.task, job.queue, 0, now) for job in jobs]
        try:
            self.store.publish_events(events.payloads(told))
        except Exception as exc:
            logger.warning("%d buffered job(s) landed, but their events could not be published: %s", len(told), exc)

    def _isolate(self, pairs: list[tuple[NewJob, bytes]], dead: dict[str, str], refusal: Exception) -> None:
        """Write a batch Postgres refused by halves, each in its own transaction, until the envelope
        it refuses stands alone: that one is stored dead with its raw text and Postgres' reason.

        A half that fails is split again (about log2 of the batch size rounds for one bad envelope);
        halves already written are skipped by id if the batch is written again after a crash.
        """
        if len(pairs) == 1:
            job, raw = pairs[0]
            rejected = envelope.refused(raw, job, f"Postgres refused it: {refusal}".strip(), self.max_payload_bytes)
            insert_staged(self.store, [rejected.job], {rejected.job.id: rejected.reason})
            logger.warning("envelope rejected (stored as dead job %s): %s", job.id, rejected.reason)
            return
        middle = len(pairs) // 2
        for half in (pairs[:middle], pairs[middle:]):
            try:
                insert_staged(self.store, [job for job, _ in half], dead)
            except Exception as exc:
                if not refuses_value(exc):
                    raise
                self._isolate(half, dead, exc)
            self.renew()

    # -- the background loop -------------------------------------------------------------------------

    def needs_reconnect(self, exc: Exception) -> bool:
        # Redis or Postgres away: keep the batch, try again after the backoff (a warning, no traceback).
        return isinstance(exc, (DatabaseUnavailable, *redis_errors())) or needs_reconnect(exc)

    def step(self) -> float:
        """Flush every ``interval`` seconds, or as soon as a full batch waits; notice lost envelopes."""
        if not self._checked:
            self._say_durability()
        if self.holding:
            # Still ours, without a break: then nobody but this flusher took envelopes since the last look.
            self.holding = self.renew()
            if not self.holding and self.redis.get(self.lock) is None:  # not taken over: Redis dropped it
                self._report(self.watch.lock_vanished(self.redis))
        if not self.holding:
            self.holding = self.acquire()
            self._recovered = False
            self.watch.reset()
        if self.holding and not self._recovered:
            self.recover()
            self._recovered = True
        if self.holding:
            lengths = self._lengths()
            self._report(self.watch.seen(lengths, self.redis))
            due = time.monotonic() - self._last >= self.interval
            if due or any(n >= self.batch_size for n in lengths):
                while self.flush_once() >= self.batch_size and not self.stopping:
                    pass
                self._last = time.monotonic()
                self.signals.emit("flushed")
        return LOOK_EVERY

    def _lengths(self) -> list[int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in self.lists:
                pipe.llen(key)
            return [int(n) for n in pipe.execute()]

    def _say_durability(self) -> None:
        """Once, at the start: what this Redis can lose of the buffer."""
        for finding in durability.findings(self.redis):
            logger.warning("the Redis buffer is not durable: %s (see docs/buffer.md, Durability)", finding)
        self._checked = True

    def _report(self, losses: list[durability.Loss]) -> None:
        for loss in losses:
            logger.error(
                "%d envelope(s) vanished from Redis list %s: %s; the jobs they carried are lost",
                loss.count,
                loss.list_name,
                loss.cause,
            )
            self.store.record_buffer_loss(loss.list_name, loss.count, loss.cause)

    def on_stop(self) -> None:
        if self.holding:
            self.release()
            self.holding = False


class _Announced(list[NewJob]):
    """The batch, reporting the step "copying" half-way through each pass over it."""

    def __init__(self, jobs: list[NewJob], on_step: Step) -> None:
        super().__init__(jobs)
        self._on_step = on_step

    def __iter__(self) -> Iterator[NewJob]:
        middle = len(self) // 2
        for index, job in enumerate(super().__iter__()):
            if index == middle:
                self._on_step("copying")
            yield job


def _batch_id(key: str, index: int) -> str:
    """The id of an envelope that brought none: the same for the same place in the same batch."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key}#{index}"))
