"""Running one job: resolve the task, decode and check its arguments, call it, and turn what
happened into an :class:`Outcome`. No SQL here; persisting outcomes is the completer's job."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import codec, errors
from .exceptions import (
    ChildProcessDied,
    ConfigurationError,
    NotRegistered,
    Reject,
    Retry,
    Snooze,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from .task import Request, Task, request_context

logger = logging.getLogger("taskpg.worker")

# Failures of the attempt itself (not of the task's logic) that are retried while attempts remain.
ATTEMPT_FAILURES = (SoftTimeLimitExceeded, TimeLimitExceeded, ChildProcessDied)


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds: the columns the claim query returns."""

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


@dataclass(frozen=True)
class Outcome:
    """What to write back for one attempt."""

    job: ClaimedJob
    state: str  # succeeded | scheduled | available | dead
    delay: float = 0.0
    result: str | None = None  # JSON text
    error: dict[str, Any] | None = None
    refund: int = 0  # 1 = this attempt does not count (snooze, rate-limit deferral, hand-back)
    snoozed: int = 0  # 1 = counts towards the task's max_snoozes

    @property
    def error_json(self) -> str | None:
        return None if self.error is None else json.dumps(self.error, default=str)


@dataclass(frozen=True)
class Call:
    """A job that passed every check and is ready to be called."""

    job: ClaimedJob
    task: Task[Any, Any]
    request: Request


def error_record(job: ClaimedJob, error_type: str, message: str, worker_id: str | None) -> dict[str, Any]:
    return {
        "attempt": job.attempt,
        "type": error_type,
        "module": "taskpg.exceptions",
        "message": message,
        "traceback": None,
        "worker": worker_id,
        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


class Executor:
    """Turns claimed jobs into calls, and calls into outcomes, for one worker."""

    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]],
        worker_id: str | None,
        max_payload_bytes: int,
        admit: Callable[[Call], float] | None = None,
        limited_queues: frozenset[str] = frozenset(),
    ) -> None:
        self.tasks = tasks
        self.worker_id = worker_id
        self.max_payload_bytes = max_payload_bytes
        self.admit = admit  # rate limits: seconds a call must wait before it may start (0 = now)
        self.limited_queues = limited_queues
        self._signatures: dict[Callable[..., Any], inspect.Signature | None] = {}
        self._async: dict[Callable[..., Any], bool] = {}

    def dead(self, job: ClaimedJob, error_type: str, message: str) -> Outcome:
        """An outcome that sends the job to the dead state with a reason that says why."""
        return Outcome(job, "dead", error=error_record(job, error_type, message, self.worker_id))

    def prepare(self, job: ClaimedJob) -> Call | Outcome:
        """Check a claimed job before running it; problems become a dead Outcome with the reason."""
        try:
            task = self.tasks[job.task]
        except NotRegistered:
            return self.dead(job, "NotRegistered", f"unknown task {job.task!r}: no task of that name is registered")
        try:
            args, kwargs = codec.loads(job.args), codec.loads(job.kwargs)
        except Exception as exc:
            return self.dead(job, "PayloadDecodeError", f"arguments cannot be decoded: {exc}")
        if len(job.args) + len(job.kwargs) > self.max_payload_bytes:  # Postgres' text adds spaces: measure
            size = len(codec.dumps(args).encode()) + len(codec.dumps(kwargs).encode())  # as enqueue did
            if size > self.max_payload_bytes:
                return self.dead(
                    job, "PayloadTooLarge", f"arguments take {size} bytes, over the limit of {self.max_payload_bytes}"
                )
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return self.dead(job, "PayloadDecodeError", "args must be a JSON list and kwargs a JSON object")
        problem = self._signature_mismatch(task, args, kwargs)
        if problem is not None:
            return self.dead(job, "ArgumentMismatch", f"arguments do not fit {task.name}{problem}")
        request = Request(
            id=job.id,
            task=job.task,
            queue=job.queue,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            args=args,
            kwargs=kwargs,
        )
        call = Call(job, task, request)
        if self.admit is not None and self.is_limited(job):
            try:
                wait = self.admit(call)
            except ConfigurationError as exc:  # e.g. a rate_limit_key that cannot be rendered for these arguments
                return self.dead(job, "ConfigurationError", str(exc))
            except Exception as exc:  # the limiter's store is unreachable: try again shortly
                logger.warning("job %s: rate limiter unavailable (%s); retrying in 1 s", job.id, exc)
                wait = 1.0
            if wait > 0:  # over a rate limit: back to the queue until its slot, attempt refunded
                return Outcome(job, "scheduled", delay=wait, refund=1)
        return call

    def is_limited(self, job: ClaimedJob) -> bool:
        """Whether starting this job needs a rate-limit decision (a task or queue limit)."""
        task = self.tasks.get(job.task)
        return (task is not None and task.options.rate_limit is not None) or job.queue in self.limited_queues

    def _signature_mismatch(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Why the stored arguments cannot bind to the function (None when they can)."""
        if task.fn not in self._signatures:
            try:
                self._signatures[task.fn] = inspect.signature(task.fn)
            except (TypeError, ValueError):
                self._signatures[task.fn] = None
        signature = self._signatures[task.fn]
        if signature is None:
            return None
        bound_args = [None, *args] if task.options.bind else args
        try:
            signature.bind(*bound_args, **kwargs)
        except TypeError as exc:
            return f"{signature}: {exc}"
        return None

    def conclude(self, call: Call, result: Any = None, exc: BaseException | None = None) -> Outcome:
        """Map a finished call (its return value or exception) to an Outcome."""
        job, options = call.job, call.task.options
        if exc is None:
            return Outcome(job, "succeeded", result=None if options.ignore_result else codec.encode_result(result))
        if isinstance(exc, Snooze):
            if job.snoozes >= options.max_snoozes:
                return self.dead(
                    job, "TooManySnoozes", f"snoozed {job.snoozes} times; the limit is {options.max_snoozes}"
                )
            return Outcome(job, "scheduled", delay=exc.seconds, refund=1, snoozed=1)
        if isinstance(exc, Reject):
            return Outcome(job, "dead", error=errors.describe(exc, job.attempt, self.worker_id))
        if isinstance(exc, Retry):
            cause = exc.exc or exc
            max_attempts = job.max_attempts if exc.max_retries is None else exc.max_retries + 1
            delay = exc.countdown if exc.countdown is not None else options.retry.delay(job.attempt)
            return self._retry_or_dead(job, cause, max_attempts, delay)
        if isinstance(exc, (*options.autoretry_for, *ATTEMPT_FAILURES)):
            return self._retry_or_dead(job, exc, job.max_attempts, options.retry.delay(job.attempt))
        return Outcome(job, "dead", error=errors.describe(exc, job.attempt, self.worker_id))

    def _retry_or_dead(self, job: ClaimedJob, exc: BaseException, max_attempts: int, delay: float) -> Outcome:
        error = errors.describe(exc, job.attempt, self.worker_id)
        if job.attempt >= max_attempts:
            return Outcome(job, "dead", error=error)
        return Outcome(job, "scheduled" if delay > 0 else "available", delay=max(0.0, delay), error=error)

    def run_sync(self, call: Call) -> Outcome:
        """Call a synchronous task in this thread."""
        try:
            with request_context(call.request):
                result = call.task.run(call.request.args, call.request.kwargs)
        except (Exception, SystemExit) as exc:
            return self.conclude(call, exc=exc)
        return self.conclude(call, result)

    async def run_async(self, call: Call, timeout: float | None = None) -> Outcome:
        """Await an ``async def`` task; past ``timeout`` it is cancelled and the attempt fails."""
        try:
            with request_context(call.request):
                result = await asyncio.wait_for(call.task.run(call.request.args, call.request.kwargs), timeout)
        except asyncio.TimeoutError:
            return self.conclude(call, exc=TimeLimitExceeded(f"{call.task.name} ran past {timeout} s"))
        except (Exception, SystemExit) as exc:
            return self.conclude(call, exc=exc)
        return self.conclude(call, result)

    def is_async(self, call: Call) -> bool:
        """Whether the call's task is an ``async def`` (asked once per task, per job after that)."""
        fn = call.task.fn
        answer = self._async.get(fn)
        if answer is None:
            answer = self._async[fn] = inspect.iscoroutinefunction(fn)
        return answer
