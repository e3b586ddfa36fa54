"""Jobs as data: the states, Celery's status names, job ids, and the records taskpg reads and writes.

Nothing here does I/O: the store (``store.py``) turns these records into statements and rows back
into them, the executor builds outcomes, enqueue builds new jobs.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable, Iterator, Mapping, Sequence


class JobState(str, Enum):
    """The state column of a job row.

    ``scheduled -> available -> running -> succeeded | scheduled (retry/snooze) | dead``;
    ``cancelled`` for a job revoked before it started. The schema's check constraint and partial
    indexes are derived from this enum (``schema.py``).
    """

    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


#: States a job never leaves (until pruned or retried by hand).
FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
#: States that hold a unique key: the job has not finished yet.
UNFINISHED_STATES = (JobState.SCHEDULED, JobState.AVAILABLE, JobState.RUNNING)


class Status(str, Enum):
    """Celery's names for what a handle reports."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


_STATUS_OF = {
    JobState.RUNNING: Status.STARTED,
    JobState.SUCCEEDED: Status.SUCCESS,
    JobState.DEAD: Status.FAILURE,
    JobState.CANCELLED: Status.REVOKED,
}


def status_of(state: str, attempt: int) -> Status:
    """Map a row's state (and whether it already ran once) to a Celery status."""
    status = _STATUS_OF.get(JobState(state))
    if status is not None:
        return status
    return Status.RETRY if attempt > 0 else Status.PENDING


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewJob:
    """A job ready to be written: arguments already encoded as JSON text."""

    id: str
    task: str
    queue: str
    args: str
    kwargs: str
    priority: int
    max_attempts: int
    eta: dt.datetime | None = None
    countdown: float = 0.0
    unique_key: str | None = None  # at most one unfinished job per key
    not_before: dt.datetime | None = None  # a deferred throttled job waits for its window
    headers: str | None = None  # JSON object text: metadata publish receivers added (a traceparent)
    links: str | None = None  # JSON object text: the jobs its end starts (canvas.py: link=, link_error=)
    expires: float | dt.datetime | None = None  # not started by then (seconds from now, or a moment): never run


#: One call of a JobBatch: (job id, args JSON, kwargs JSON).
Row = tuple[str, str, str]


@dataclass(frozen=True)
class JobBatch:
    """Calls of one task that share every option (``delay_many``'s COPY path).

    ``rows`` is read once, while the COPY runs; it may raise to abort the batch (nothing is written).
    """

    task: str
    queue: str
    priority: int
    max_attempts: int
    rows: Iterable[Row]
    eta: dt.datetime | None = None
    countdown: float = 0.0


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds: the columns the claim returns."""

    id: str
    task: str
    queue: str
    priority: int
    run_at: dt.datetime
    args: str
    kwargs: str
    attempt: int
    max_attempts: int
    snoozes: int
    lease: str
    #: The start a rate limiter reserved for the job (epoch seconds, the limiter's clock; None: none). It
    #: starts then without asking again (the limiter already counted it).
    slot_at: float | None = None
    #: It was rescued from a worker that died before: its start is recorded before it runs, and it runs in
    #: a child process where the pool has them, so that if it kills its process it takes no other job along.
    suspect: bool = False
    #: The size of its arguments' text in Postgres when the claim left them out as far over the limit
    #: (``args`` and ``kwargs`` are then empty); 0 when they were fetched.
    oversize: int = 0
    #: Its headers' JSON text (metadata set at enqueue, a traceparent), or None.
    headers: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What to write back for one attempt."""

    job: ClaimedJob
    state: JobState  # succeeded | scheduled | available | dead
    delay: float = 0.0
    result: str | None = None  # JSON text
    error: dict[str, Any] | None = None  # a failure record (failures.py)
    refund: int = 0  # 1 = this attempt does not count (snooze, rate-limit deferral, hand-back)
    snoozed: int = 0  # 1 = counts towards the task's max_snoozes
    keep_place: bool = False  # keep run_at, so the job keeps its place in its queue (a hand-back)
    slot_at: float | None = None  # a start a rate limiter reserved for the job (epoch seconds, limiter's clock)
    wake_at: float | None = None  # then the job is due again at this moment, a little before its start


@dataclass(frozen=True)
class JobRecord:
    """Every column of one job row that a reader needs (``taskpg inspect``, ``AsyncResult``)."""

    id: str
    task: str
    queue: str
    state: str
    attempt: int
    max_attempts: int
    snoozes: int
    priority: int
    args: Any
    kwargs: Any
    result: Any
    errors: list[dict[str, Any]]
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    worker_id: str | None
    #: ``{"state": ..., "meta": ...}`` from ``self.update_state()`` (None: the job never said).
    progress: dict[str, Any] | None = None
    #: The job whose end inserted this one (a link, a chain's step, a chord's body).
    parent_id: str | None = None


# -- ids -------------------------------------------------------------------------------------------


def validate_job_id(job_id: str) -> str:
    """Job ids are UUIDs; anything else is refused before it reaches SQL."""
    try:
        return str(uuid.UUID(str(job_id)))
    except ValueError:
        raise ConfigurationError(f"{job_id!r} is not a taskpg job id (a UUID)") from None


_random = threading.local()


def _forget_pool() -> None:
    _random.pool = b""


os.register_at_fork(after_in_child=_forget_pool)  # a forked child must never reuse the parent's bytes


def _random_bits() -> int:
    """80 random bits, from os.urandom fetched in blocks (one system call per 4096 ids)."""
    pool = getattr(_random, "pool", b"")
    if len(pool) < 10:
        pool = os.urandom(40960)
    _random.pool = pool[10:]
    return int.from_bytes(pool[:10], "big")


def new_job_id() -> str:
    """A UUIDv7 string: time-ordered (friendly to the primary-key index) and made client-side,
    so a job has its final id before it reaches Postgres."""
    millis = time.time_ns() // 1_000_000
    rand = _random_bits()
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # 12 random bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def job_id_sequence() -> Iterator[str]:
    """UUIDv7 strings for one batch, made in bulk (RFC 9562, "monotonic random").

    They share the batch's millisecond and 12 random bits; the 62 bits under the variant start at a
    random value below 2**61 and count up by one. So the ids are unique, time-ordered like
    ``new_job_id``'s, and sort in the order they were made (a batch is claimed first to last).
    """
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    high = (millis & ((1 << 48) - 1)) << 16 | 0x7 << 12 | (rand >> 64) & 0xFFF
    h = f"{high:016x}"
    prefix = f"{h[:8]}-{h[8:12]}-{h[12:]}-"
    start = 0b10 << 62 | rand & ((1 << 61) - 1)  # the variant, then a counter with room for 2**61 ids
    for low in itertools.count(start):
        t = f"{low:016x}"
        yield f"{prefix}{t[:4]}-{t[4:]}"


@dataclass
class Request:
    """What a bound task (``bind=True``) sees as ``self.request`` while it runs."""

    id: str | None = None
    task: str | None = None
    queue: str | None = None
    attempt: int = 0
    max_attempts: int = 1
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Metadata set at enqueue by ``before_task_publish`` receivers (a W3C ``traceparent``, say).
    headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def retries(self) -> int:
        """Celery's name: how many times this job was retried before this attempt."""
        return max(0, self.attempt - 1)

    @classmethod
    def of(cls, job: ClaimedJob, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Request:
        """The request of one attempt of a claimed job, with its decoded arguments."""
        headers = json.loads(job.headers) if job.headers else {}
        return cls(job.id, job.task, job.queue, job.attempt, job.max_attempts, args, kwargs, headers)
