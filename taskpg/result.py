"""``AsyncResult``: the handle every enqueue returns."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import TYPE_CHECKING, Any, Protocol

from . import failures, signals
from .exceptions import ConfigurationError, JobExpired, TaskError, TaskRevoked, TimeoutError
from .job import FINISHED_STATES, JobRecord, JobState, Request, Status, status_of, validate_job_id

if TYPE_CHECKING:
    from .store import Store

# get() waits on LISTEN/NOTIFY; this re-check only guards against a missed notification.
SAFETY_RECHECK_SECONDS = 5.0


class ResultHost(Protocol):
    """What a handle needs from its app (``TaskPG`` is one): where the job rows are."""

    @property
    def store(self) -> Store: ...


class AsyncResult:
    """A job's id and a view of its state (Celery's names and methods)."""

    def __init__(self, app: ResultHost, id: str, task_name: str | None = None, *, throttled: bool = False) -> None:
        self.app = app
        #: An id that is no job id (not a UUID) names no job: its handle is PENDING for ever, as in Celery.
        self._known = _is_job_id(str(id))
        self.id = validate_job_id(id) if self._known else str(id)
        self.task_name = task_name
        #: True when a throttle dropped this call: no job was written.
        self.throttled = throttled
        #: The handle of the job (or group) before this one in a canvas, when this handle was made by one; else
        #: read from the row (the job whose end inserted this one).
        self._parent: AsyncResult | GroupResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self.task_name or ''}>".replace(" >", ">")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _row(self, store: Store | None = None) -> JobRecord | None:
        if self.throttled:  # a throttle turned the call away: it behaves as a job revoked at once
            return _turned_away(self.id, self.task_name)
        if not self._known:
            return None
        return (store or self.app.store).get_job(self.id)

    @property
    def parent(self) -> AsyncResult | GroupResult | None:
        """The handle of what came before this job in a canvas (Celery's ``result.parent``)."""
        if self._parent is None:
            row = self._row()
            if row is not None and row.parent_id is not None:
                self._parent = AsyncResult(self.app, row.parent_id)
        return self._parent

    @parent.setter
    def parent(self, value: AsyncResult | GroupResult | None) -> None:
        self._parent = value

    @property
    def children(self) -> list[AsyncResult]:
        """Handles of the jobs this job's end started (its ``link=`` callbacks, a chain's next step)."""
        if not self._known:
            return []
        children = [AsyncResult(self.app, child) for child in self.app.store.children(self.id)]
        for child in children:
            child._parent = self
        return children

    def _ancestors(self) -> list[str]:
        """Ids of the jobs before this one that its handle knows (canvas handles), nearest first."""
        found: list[str] = []
        pending: list[AsyncResult | GroupResult | None] = [self._parent]
        while pending:
            item = pending.pop(0)
            if isinstance(item, GroupResult):
                pending.extend(item.results)
            elif isinstance(item, AsyncResult):
                found.append(item.id)
                pending.append(item._parent)
        return found

    def record(self) -> dict[str, Any] | None:
        """The job's row as a dict (None if no such job exists)."""
        row = self._row()
        return None if row is None else dataclasses.asdict(row)

    @property
    def status(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED; while the job runs, the custom state it
        set with ``self.update_state()`` (PROGRESS, say)."""
        row = self._row()
        if row is None:
            return Status.PENDING.value
        if row.state == JobState.RUNNING and row.progress and row.progress.get("state"):
            return str(row.progress["state"])
        return status_of(row.state, row.attempt).value

    @property
    def info(self) -> Any:
        """Celery's ``info``: while the job runs in a custom state, that state's ``meta``
        (``self.update_state``); once it finished, its result (the exception for a failure); else None."""
        row = self._row()
        if row is None:
            return None
        if JobState(row.state) in FINISHED_STATES:
            return self._outcome(row, propagate=False)
        if row.state == JobState.RUNNING and row.progress and row.progress.get("state"):
            return row.progress.get("meta")
        return None

    @property
    def progress(self) -> Any:
        """BullMQ's ``progress``: the last value the job gave ``self.update_progress()`` (a number, or any
        JSON), kept once it finished; None when it gave none."""
        row = self._row()
        return None if row is None or not row.progress else row.progress.get("progress")

    state = status

    def ready(self) -> bool:
        """True once the job has finished (succeeded, failed for good, or revoked)."""
        return self.status in (Status.SUCCESS, Status.FAILURE, Status.REVOKED)

    def successful(self) -> bool:
        return self.status == Status.SUCCESS

    def failed(self) -> bool:
        return self.status == Status.FAILURE

    @property
    def result(self) -> Any:
        """The return value once succeeded, the exception once failed or revoked, else None."""
        row = self._row()
        if row is None or JobState(row.state) not in FINISHED_STATES:
            return None
        return self._outcome(row, propagate=False)

    @property
    def traceback(self) -> str | None:
        """The traceback of the last failed attempt, if any."""
        row = self._row()
        return row.errors[-1].get("traceback") if row and row.errors else None

    def get(self, timeout: float | None = None, propagate: bool = True, follow_parents: bool = True) -> Any:
        """Wait until the job finishes and return its result.

        Waits on LISTEN/NOTIFY (no busy polling). Raises the task's exception on failure
        (``propagate=False`` returns it instead), ``TaskRevoked`` for a revoked job and
        ``taskpg.TimeoutError`` when ``timeout`` seconds pass first. With ``follow_parents`` (Celery's
        default), a canvas handle also ends when a job before it failed, with that job's error: a chain's
        later steps never run after a failed one.
        """
        if self.throttled:
            return self._outcome(_turned_away(self.id, self.task_name), propagate)
        deadline = None if timeout is None else time.monotonic() + timeout
        ancestors = self._ancestors() if follow_parents else []

        def wait(store: Store) -> JobRecord:
            store.listen_for_finished()
            try:
                return self._wait(store, deadline, timeout, ancestors)
            finally:
                store.unlisten()

        return self._outcome(self.app.store.run(wait), propagate)

    def _wait(self, store: Store, deadline: float | None, timeout: float | None, ancestors: list[str]) -> JobRecord:
        while True:
            # LISTEN is already active, so a completion after this read still wakes us.
            row = self._row(store)
            if row is not None and JobState(row.state) in FINISHED_STATES:
                return row
            failed = store.first_failed(ancestors) if ancestors and row is None else None
            if failed is not None:
                return failed
            remaining = SAFETY_RECHECK_SECONDS if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
            # The row's id differs from ours when this call was a buffered duplicate of a unique job.
            wanted = {self.id, *ancestors} if row is None else {self.id, row.id}
            for payload in store.notifications(min(remaining, SAFETY_RECHECK_SECONDS)):
                if not wanted.isdisjoint(payload.split(",")):
                    break

    def _outcome(self, row: JobRecord, propagate: bool) -> Any:
        if row.state == JobState.SUCCEEDED:
            return row.result
        if row.state == JobState.CANCELLED:
            reason = "was turned away by its throttle" if self.throttled else "was revoked"
            expired = row.errors[-1] if row.errors and row.errors[-1].get("type") == "JobExpired" else None
            exc: BaseException = (
                JobExpired(f"job {row.id} {expired['message']}") if expired else TaskRevoked(f"job {row.id} {reason}")
            )
        else:
            exc = failures.rebuild(row.errors[-1]) if row.errors else TaskError(f"job {self.id} is dead")
        if propagate:
            raise exc
        return exc

    def forget(self) -> bool:
        """Celery's ``forget()``: delete the finished job's row, its result and error history with it (the
        handle reads PENDING again). A job that has not finished is kept; returns whether one was deleted."""
        if self.throttled or not self._known:
            return False
        return self.app.store.forget(self.id)

    def revoke(self) -> bool:
        """Cancel the job if it has not started; True if it was cancelled by this call."""
        if self.throttled or not self._known:
            return False
        revoked = self.app.store.revoke(self.id)
        if revoked and signals.task_revoked.receivers:
            request = Request(id=self.id, task=self.task_name)
            sender = getattr(self.app, "tasks", {}).get(self.task_name) if self.task_name else None
            signals.task_revoked.send(
                sender=sender or self.task_name, request=request, terminated=False, signum=None, expired=False
            )
        return revoked


class GroupResult:
    """The handles of a group's members, in order (Celery's ``GroupResult``)."""

    def __init__(self, app: ResultHost, id: str, results: list[AsyncResult]) -> None:
        self.app = app
        self.id = id
        self.results = list(results)
        self.parent: AsyncResult | GroupResult | None = None

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Any:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    @property
    def children(self) -> list[AsyncResult]:
        return list(self.results)

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Every member's result, in order (waiting up to ``timeout`` seconds in all); the first failure
        raises unless ``propagate=False``, which puts exceptions in the list instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=remaining, propagate=propagate))
        return values

    join = get

    def ready(self) -> bool:
        """True once every member has finished."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        """True when a member failed."""
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        """True while a member has not finished."""
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for r in self.results if r.successful())

    def revoke(self) -> int:
        """Revoke the members that have not started; returns how many were."""
        return sum(1 for r in self.results if r.revoke())


def _is_job_id(text: str) -> bool:
    try:
        validate_job_id(text)
    except ConfigurationError:
        return False
    return True


def _turned_away(job_id: str, task: str | None) -> JobRecord:
    """What a handle of a call a throttle turned away reports: a job revoked at once, never written."""
    epoch = dt.datetime.fromtimestamp(0, dt.timezone.utc)
    return JobRecord(
        id=job_id,
        task=task or "",
        queue="",
        state=JobState.CANCELLED.value,
        attempt=0,
        max_attempts=0,
        snoozes=0,
        priority=0,
        args=[],
        kwargs={},
        result=None,
        errors=[],
        run_at=epoch,
        created_at=epoch,
        started_at=None,
        finished_at=None,
        worker_id=None,
    )
