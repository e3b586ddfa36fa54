"""Queue control for operators: pause and resume a queue, purge waiting jobs.

A pause is a row in the queue_pauses table, read by every claim: it holds for every worker from its
commit on, whatever process made it, and survives restarts. Jobs claimed before the pause (running, or
held ahead by a worker's prefetch) run to their end. Resume deletes the row and wakes the queue's
workers by NOTIFY. Purge cancels waiting jobs (available and scheduled); running jobs are not touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .options import validate_queue_name

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence

    from .store import Store


def pause_queue(store: Store, queue: str) -> bool:
    """Stop the claims of ``queue``'s jobs; False when it was paused already."""
    return store.pause_queue(validate_queue_name(queue))


def resume_queue(store: Store, queue: str) -> bool:
    """Let ``queue``'s jobs be claimed again, waking its workers; False when it was not paused."""
    return store.resume_queue(validate_queue_name(queue))


def paused_queues(store: Store) -> dict[str, dt.datetime]:
    """Paused queue -> when it was paused."""
    return store.paused_queues()


def count_waiting(store: Store, queues: Sequence[str] | None = None, task: str | None = None) -> int:
    """How many jobs ``purge`` would cancel now."""
    return store.count_waiting(_checked(queues), task)


def purge(store: Store, queues: Sequence[str] | None = None, task: str | None = None) -> int:
    """Cancel the waiting jobs (available and scheduled) of ``queues`` (all when None) and/or of ``task``;
    returns how many. Their handles read ``REVOKED``; running jobs are left alone."""
    return len(store.purge_waiting(_checked(queues), task))


def _checked(queues: Sequence[str] | None) -> list[str] | None:
    return None if queues is None else [validate_queue_name(q) for q in queues]
