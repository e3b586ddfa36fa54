"""Dead jobs: list them, bring them back, purge them, and route a job that just died to its
task's ``dead_letter``. Nothing is deleted unless asked."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import codec
from .enqueue import insert_job
from .job import NewJob, new_job_id, validate_job_id

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .store import DeadJob, Store
    from .task import Task

logger = logging.getLogger("taskpg.worker")


def list_dead(store: Store, queue: str | None = None, task: str | None = None, limit: int = 100) -> list[DeadJob]:
    """Dead jobs, newest first, with the last error of each."""
    return store.dead_list(queue, task, limit)


def retry_dead(
    store: Store, ids: Sequence[str] | None = None, queue: str | None = None, task: str | None = None
) -> int:
    """Make dead jobs available again with fresh attempts (their error history is kept).

    ``ids=None`` means every dead job matching ``queue``/``task``. Returns how many came back.
    """
    return store.dead_retry(None if ids is None else [validate_job_id(i) for i in ids], queue, task)


def purge_dead(
    store: Store,
    older_than: float,
    queue: str | None = None,
    task: str | None = None,
    ids: Sequence[str] | None = None,
) -> int:
    """Delete dead jobs that died more than ``older_than`` seconds ago (only those of ``ids`` if given);
    returns how many."""
    return store.dead_purge(older_than, queue, task, None if ids is None else [validate_job_id(i) for i in ids])


def route_dead_letter(store: Store, job_id: str, tasks: Mapping[str, Task[Any, Any]]) -> None:
    """Send a job that just died to its task's ``dead_letter``: a handler task, or a queue.

    Runs in the transaction that made the job dead (``store`` is bound to it). A job already in its
    dead-letter queue is not routed again (a failing copy would otherwise copy itself for ever).
    """
    job = store.get_job(job_id)
    task = tasks.get(job.task) if job else None
    target = task.options.dead_letter if task is not None else None
    if job is None or target is None or job.queue == target:
        return
    new_id = new_job_id()
    handler = tasks.get(target)
    if handler is not None:  # a handler task receives the dead job, its error history included
        dead_job = {
            "id": job.id,
            "task": job.task,
            "queue": job.queue,
            "args": job.args,
            "kwargs": job.kwargs,
            "errors": job.errors,
        }
        args_json, kwargs_json = codec.encode_arguments(handler.name, (), {"job": dead_job}, codec.MAX_PAYLOAD_BYTES)
        options = handler.options
        new = NewJob(
            new_id, handler.name, options.queue, args_json, kwargs_json, options.priority, options.max_attempts
        )
        insert_job(store, new)
    else:  # a dead-letter queue receives a copy of the job with its history
        store.copy_to_queue(job_id, new_id, target)
    logger.warning("job %s %s is dead; routed to dead_letter %r as job %s", job_id, job.task, target, new_id)
