"""Writing new jobs: one INSERT, COPY for many, idempotent staged inserts.

Each function takes a store: on the app's pool (the write is its own transaction, tried once more
after a lost connection) or bound to the caller's connection (the write joins the caller's
transaction and commits or rolls back with it).

Waking workers: a write on the caller's connection NOTIFYs inside the caller's transaction
(delivered only if it commits). On the app's own connections it does the same, unless the app has
an ``announce`` function (``notify_debounce``): then the statement does not notify, and
``announce(queue)`` is called after the commit (see notifier.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from . import guards

if TYPE_CHECKING:
    from .guards import Guard, Written
    from .job import JobBatch, NewJob, Row
    from .store import Store

#: Tell the workers of a queue that it has new jobs due now, after the enqueue committed.
Announce = Callable[[str], None]


def _write(store: Store, job: NewJob, guard: Guard | None, notify: bool) -> Written:
    if guard is None and job.unique_key is None:  # the common case: one statement
        return guards.Written(job.id, store.insert_job(job, notify).due)
    return guards.insert_guarded(store, job, guard, notify)


def insert_job(store: Store, job: NewJob, guard: Guard | None = None, announce: Announce | None = None) -> str | None:
    """Insert one job (and wake its queue if it is due now).

    Returns the id of the job that stands for this call: the new job, or the job already holding
    its unique key; None when a throttle turned the call away.
    """
    if store.bound:
        return store.run(lambda s: _write(s, job, guard, notify=True)).holder
    written = store.run(lambda s: _write(s, job, guard, notify=announce is None))
    if written.due and announce is not None:
        announce(job.queue)
    return written.holder


def insert_jobs(
    store: Store, jobs: Sequence[NewJob], job_guards: Sequence[Guard | None], announce: Announce | None = None
) -> list[str | None]:
    """Insert jobs one by one (each with its checks) in one transaction; returns what insert_job does."""
    notify = store.bound or announce is None

    def write(s: Store) -> tuple[list[str | None], set[str]]:
        holders: list[str | None] = []
        due: set[str] = set()
        with s.transaction() as tx:
            for job, guard in zip(jobs, job_guards, strict=True):
                written = _write(tx, job, guard, notify)
                holders.append(written.holder)
                if written.due:
                    due.add(job.queue)
        return holders, due

    holders, due = store.run(write)
    if not store.bound and announce is not None:
        for queue in sorted(due):
            announce(queue)
    return holders


def copy_batch(store: Store, batch: JobBatch, announce: Announce | None = None) -> int:
    """COPY a batch in one transaction (the caller's, if the store is bound to it) and wake its
    queue. Returns the count."""
    if store.bound:

        def in_callers(tx: Store) -> int:
            with tx.transaction():  # a savepoint: a failed COPY leaves the caller's transaction usable
                copied = tx.copy_batch(batch, batch.rows, run_at_default=False)
                if copied.due:
                    tx.notify_queues([batch.queue])
            return copied.count

        return store.run(in_callers)

    pending = iter(batch.rows)
    first = next(pending, None)
    if first is None:
        return 0
    consumed = False

    def stream() -> Iterator[Row]:
        nonlocal consumed
        consumed = True
        yield first
        yield from pending

    def write(s: Store) -> tuple[int, bool]:
        with s.transaction() as tx:
            copied = tx.copy_batch(batch, stream(), run_at_default=True)
            if copied.due and announce is None:
                tx.notify_queues([batch.queue])
        return copied.count, copied.due

    # The rows are streamed, not kept: a lost connection is retried only before the first row left.
    count, due = store.run(write, can_retry=lambda: not consumed)
    if due and announce is not None:
        announce(batch.queue)
    return count


def insert_staged(store: Store, jobs: Sequence[NewJob], dead_reasons: Mapping[str, str] | None = None) -> int:
    """Insert jobs that may already be in the table (a re-flushed batch), idempotently by id.

    Jobs named in ``dead_reasons`` are stored dead with that reason as their only error. Returns how
    many were new. ``jobs`` is a sequence, not an iterator: a retry after a lost connection must
    write the same jobs again.
    """

    def write(s: Store) -> int:
        with s.transaction() as tx:
            return tx.copy_staged(jobs, dead_reasons or {})

    return store.run(write)
