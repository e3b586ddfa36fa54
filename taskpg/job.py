"""Job states, Celery status names and job ids."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from enum import Enum


class JobState(str, Enum):
    """The state column of a job row.

    ``scheduled -> available -> running -> succeeded | scheduled (retry/snooze) | dead``;
    ``cancelled`` for a job revoked before it started.
    """

    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})


class Status(str, Enum):
    """Celery's names for what a handle reports."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


def status_of(state: str, attempt: int) -> Status:
    """Map a row's state (and whether it already ran once) to a Celery status."""
    job_state = JobState(state)
    if job_state is JobState.RUNNING:
        return Status.STARTED
    if job_state is JobState.SUCCEEDED:
        return Status.SUCCESS
    if job_state is JobState.DEAD:
        return Status.FAILURE
    if job_state is JobState.CANCELLED:
        return Status.REVOKED
    return Status.RETRY if attempt > 0 else Status.PENDING


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
