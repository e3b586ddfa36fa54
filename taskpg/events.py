"""Job events across processes, over LISTEN/NOTIFY (Celery's ``worker -E``, BullMQ's ``QueueEvents``).

Opt-in, as in Celery: an app made with ``events=True`` (or ``TASKPG_EVENTS=1``; ``taskpg worker -E``)
publishes an event when it enqueues a job, and its workers when a job starts and when an attempt's
outcome is written. ``app.events()`` yields them, in any process, with no polling and no Redis.

Events travel on the channel ``taskpg_<schema>_events`` as JSON arrays of ``[type, job id, task, queue,
attempt, time]``, several per notification (at most ~7,900 bytes each). Workers publish from one
background loop every 10 ms, after the outcome's commit (an event never announces what a reader of the
row cannot see yet); a publisher that cannot keep up drops events and counts them. Delivery is what
NOTIFY gives: to sessions listening at the time, lost if the listener's connection drops meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .job import JobState
from .loops import BackgroundLoop

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator

    from .job import ClaimedJob, Outcome
    from .store import Store

logger = logging.getLogger("taskpg.events")

#: Every event type, in a job's life order.
EVENT_TYPES = ("enqueued", "started", "progress", "succeeded", "failed", "retried", "snoozed", "dead")
#: Bytes of one NOTIFY payload (Postgres' limit is 8,000).
PAYLOAD_BYTES = 7_900
#: Events a worker keeps waiting for its publisher; past it, new ones are dropped (and counted).
MAX_WAITING = 100_000
PUBLISH_EVERY = 0.01


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job: ``type`` (see EVENT_TYPES), ``at`` in epoch seconds (the sender's clock)."""

    type: str
    job_id: str
    task: str
    queue: str
    attempt: int
    at: float
    #: For ``progress``: ``{"state": ..., "meta": ...}`` as the task gave it to ``update_state()``.
    data: Any = None

    def as_list(self) -> list[object]:
        head: list[object] = [self.type, self.job_id, self.task, self.queue, self.attempt, round(self.at, 6)]
        return head if self.data is None else [*head, self.data]


def started(job: ClaimedJob) -> JobEvent:
    return JobEvent("started", job.id, job.task, job.queue, job.attempt, time.time())


def of_outcome(outcome: Outcome) -> list[JobEvent]:
    """The events of one written outcome: ``succeeded``; ``failed`` then ``retried`` or ``dead``; ``snoozed``;
    ``dead`` for a job that never ran (unknown task, bad arguments). A hand-back at shutdown sends none."""
    job, now = outcome.job, time.time()

    def event(kind: str) -> JobEvent:
        return JobEvent(kind, job.id, job.task, job.queue, job.attempt, now)

    state = JobState(outcome.state)
    if state == JobState.SUCCEEDED:
        return [event("succeeded")]
    if state == JobState.DEAD:  # an attempt that ran and raised has a traceback; checks before a run have none
        ran = bool(outcome.error and outcome.error.get("traceback"))
        return [event("failed"), event("dead")] if ran else [event("dead")]
    if outcome.snoozed:
        return [event("snoozed")]
    if outcome.error is not None and not outcome.refund:
        return [event("failed"), event("retried")]
    return []


def payloads(events: Iterable[JobEvent]) -> list[str]:
    """The events as NOTIFY payloads of at most PAYLOAD_BYTES each."""
    out: list[str] = []
    chunk: list[str] = []
    size = 2
    for item in events:
        text = json.dumps(item.as_list(), separators=(",", ":"), ensure_ascii=False)
        length = len(text.encode()) + 1
        if chunk and size + length > PAYLOAD_BYTES:
            out.append("[" + ",".join(chunk) + "]")
            chunk, size = [], 2
        chunk.append(text)
        size += length
    if chunk:
        out.append("[" + ",".join(chunk) + "]")
    return out


def decode(payload: str) -> list[JobEvent]:
    """The events of one payload (a malformed one yields none: it was not ours)."""
    try:
        items = json.loads(payload)
        return [
            JobEvent(str(t), str(i), str(k), str(q), int(a), float(at), *rest) for t, i, k, q, a, at, *rest in items
        ]
    except (ValueError, TypeError):
        logger.warning("ignoring a malformed event payload: %.80r", payload)
        return []


class EventPublisher(BackgroundLoop):
    """A worker's events, published every 10 ms in one statement; ``add`` never waits."""

    def __init__(self, store: Store, stop_event: threading.Event | None = None) -> None:
        super().__init__("events", store, stop_event=stop_event)
        self._waiting: deque[JobEvent] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, events: Iterable[JobEvent]) -> None:
        with self._lock:
            for event in events:
                if len(self._waiting) >= MAX_WAITING:
                    self.dropped += 1
                else:
                    self._waiting.append(event)

    def step(self) -> float:
        self.publish()
        return PUBLISH_EVERY

    def publish(self) -> int:
        """Send what waits; returns how many events were sent. Kept for the next step if Postgres is away."""
        with self._lock:
            batch = list(self._waiting)
        if not batch:
            return 0
        self.store.publish_events(payloads(batch))
        with self._lock:
            for _ in batch:
                self._waiting.popleft()
        return len(batch)

    def on_stop(self) -> None:
        try:
            self.publish()
        except Exception as exc:  # at exit, with Postgres away: say what was not sent
            logger.warning("%d event(s) not published at shutdown: %s", len(self._waiting), exc)


async def alisten(
    store: Store,
    queues: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    timeout: float | None = None,
    on_listening: Callable[[], None] | None = None,
) -> AsyncIterator[JobEvent]:
    """``listen`` for asyncio code: the LISTEN runs in a thread of its own, events come through a queue,
    so the event loop never blocks. Closing the async iterator stops the thread within a second."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[JobEvent | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def deliver(item: JobEvent | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(arrived.put_nowait, item)
        except RuntimeError:  # the consumer's loop closed before this thread saw the stop: nobody to tell
            stop.set()

    def pump() -> None:
        try:
            for event in listen(store, queues, types, timeout, on_listening, stop):
                deliver(event)
        except BaseException as exc:  # raised in the consumer's task instead
            deliver(exc)
            return
        deliver(None)

    thread = threading.Thread(target=pump, name="taskpg-events", daemon=True)
    thread.start()
    try:
        while True:
            item = await arrived.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def listen(
    store: Store,
    queues: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    timeout: float | None = None,
    on_listening: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[JobEvent]:
    """Yield events as they come (see ``TaskPG.events``); ends after ``timeout`` seconds without one, or
    within a second of ``stop`` being set."""
    wanted_queues = None if queues is None else set(queues)
    wanted_types = None if types is None else set(types)
    unknown = (wanted_types or set()) - set(EVENT_TYPES)
    if unknown:
        raise ValueError(f"unknown event type(s) {sorted(unknown)}: expected some of {', '.join(EVENT_TYPES)}")
    window = 1.0 if timeout is None else min(timeout, 1.0)
    with store.connections.direct() as conn:  # its own session: a long LISTEN holds no pool connection
        bound = store.on(conn)
        bound.listen_for_events()
        if on_listening is not None:
            on_listening()
        last = time.monotonic()
        while stop is None or not stop.is_set():
            for payload in bound.notifications(window):
                last = time.monotonic()
                for event in decode(payload):
                    if (wanted_queues is None or event.queue in wanted_queues) and (
                        wanted_types is None or event.type in wanted_types
                    ):
                        yield event
            if timeout is not None and time.monotonic() - last >= timeout:
                return
