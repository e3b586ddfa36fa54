"""Running one job: resolve the task, decode and check its arguments, call it, and turn what
happened into an :class:`Outcome`. Pure: no I/O of its own (rate limits are decided by the pool
through ``limiter.py``, outcomes are written by the completer)."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec, failures, hooks, signals
from .exceptions import (
    ChildProcessDied,
    NotRegistered,
    Reject,
    Retry,
    Snooze,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from .job import ClaimedJob, JobState, Outcome, Request
from .task import Task, request_context

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# Failures of the attempt itself (not of the task's logic) that are retried while attempts remain.
ATTEMPT_FAILURES = (SoftTimeLimitExceeded, TimeLimitExceeded, ChildProcessDied)


@dataclass(frozen=True)
class Call:
    """A job that passed every check and is ready to be called."""

    job: ClaimedJob
    task: Task[Any, Any]
    request: Request


@dataclass(frozen=True)
class Ran:
    """One attempt's outcome and what the task returned or raised (for the signals ``tell`` sends)."""

    outcome: Outcome
    result: Any = None
    exc: BaseException | None = None


class _RaisedByTask(Exception):
    """Carries a TimeoutError the task raised itself past ``wait_for``, which raises the same class."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


class Executor:
    """Turns claimed jobs into calls, and calls into outcomes, for one worker."""

    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]],
        worker_id: str | None,
        max_payload_bytes: int,
    ) -> None:
        self.tasks = tasks
        self.worker_id = worker_id
        self.max_payload_bytes = max_payload_bytes
        self._signatures: dict[Callable[..., Any], inspect.Signature | None] = {}
        self._async: dict[Callable[..., Any], bool] = {}

    def dead(self, job: ClaimedJob, error_type: str, message: str) -> Outcome:
        """An outcome that sends the job to the dead state with a reason that says why."""
        return Outcome(job, JobState.DEAD, error=failures.record(error_type, message, job.attempt, self.worker_id))

    def too_large(self, job: ClaimedJob, size: int, measured: str) -> Outcome:
        """Dead: the arguments are over this worker's limit (raise it, then ``taskpg dead retry``)."""
        message = f"arguments take {size} bytes ({measured}), over the limit of {self.max_payload_bytes}"
        return self.dead(job, "PayloadTooLarge", message)

    def failed(self, job: ClaimedJob, error_type: str, message: str) -> Outcome:
        """An attempt that could not finish (the worker stopped): retried while attempts remain."""
        state = JobState.DEAD if job.attempt >= job.max_attempts else JobState.AVAILABLE
        return Outcome(job, state, error=failures.record(error_type, message, job.attempt, self.worker_id))

    @staticmethod
    def deferred(job: ClaimedJob, wait: float) -> Outcome:
        """Back to the queue for ``wait`` seconds without spending the attempt (the limiter is away)."""
        return Outcome(job, JobState.SCHEDULED, delay=wait, refund=1)

    @staticmethod
    def reserved(job: ClaimedJob, wait: float, slot_at: float, lead: float) -> Outcome:
        """Back to the queue until ``lead`` seconds before the start a rate limiter reserved for it
        (``slot_at``, ``wait`` seconds from now), without spending the attempt."""
        wake = max(0.0, wait - lead)
        return Outcome(job, JobState.SCHEDULED, delay=wake, refund=1, slot_at=slot_at, wake_at=slot_at - wait + wake)

    @staticmethod
    def handed_back(job: ClaimedJob) -> Outcome:
        """A claimed job that never started goes back as it was (shutdown): attempt refunded, and its
        run_at kept, so it is claimed again before jobs enqueued after it."""
        return Outcome(job, JobState.AVAILABLE, refund=1, keep_place=True)

    def prepare(self, job: ClaimedJob) -> Call | Outcome:
        """Check a claimed job before running it; problems become a dead Outcome with the reason."""
        task = self._task(job)
        if isinstance(task, Outcome):
            return task
        if job.oversize:
            return self.too_large(job, job.oversize, "as stored in Postgres; not fetched")
        try:
            args, kwargs = codec.loads(job.args), codec.loads(job.kwargs)
        except Exception as exc:
            return self.dead(job, "PayloadDecodeError", f"arguments cannot be decoded: {exc}")
        if len(job.args) + len(job.kwargs) > self.max_payload_bytes:  # Postgres' text adds spaces: measure
            size = len(codec.dumps(args).encode()) + len(codec.dumps(kwargs).encode())  # as enqueue did
            if size > self.max_payload_bytes:
                return self.too_large(job, size, "as JSON")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return self.dead(job, "PayloadDecodeError", "args must be a JSON list and kwargs a JSON object")
        problem = self._signature_mismatch(task, args, kwargs)
        if problem is not None:
            return self.dead(job, "ArgumentMismatch", f"arguments do not fit {task.name}{problem}")
        request = Request.of(job, args, kwargs)
        return Call(job, task, request)

    def adopt(self, job: ClaimedJob, request: Request) -> Call | Outcome:
        """The call for a job another executor prepared already (the processes pool's parent): the
        task is looked up here, the arguments are not decoded again."""
        task = self._task(job)
        return task if isinstance(task, Outcome) else Call(job, task, request)

    def _task(self, job: ClaimedJob) -> Task[Any, Any] | Outcome:
        try:
            return self.tasks[job.task]
        except NotRegistered as exc:
            message = f"unknown task {job.task!r}: no task of that name is registered"
            hooks.unknown_task(job.task, job.id, message, exc)
            return self.dead(job, "NotRegistered", message)

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
            result_json = None if options.ignore_result else codec.encode_result(result)
            return Outcome(job, JobState.SUCCEEDED, result=result_json)
        if isinstance(exc, Snooze):
            if job.snoozes >= options.max_snoozes:
                return self.dead(
                    job, "TooManySnoozes", f"snoozed {job.snoozes} times; the limit is {options.max_snoozes}"
                )
            return Outcome(job, JobState.SCHEDULED, delay=exc.seconds, refund=1, snoozed=1)
        if isinstance(exc, Reject):
            return Outcome(job, JobState.DEAD, error=failures.from_exception(exc, job.attempt, self.worker_id))
        if isinstance(exc, Retry):
            cause = exc.exc or exc
            max_attempts = job.max_attempts if exc.max_retries is None else exc.max_retries + 1
            delay = exc.countdown if exc.countdown is not None else options.retry.delay(job.attempt)
            return self._retry_or_dead(job, cause, max_attempts, delay)
        if isinstance(exc, (*options.autoretry_for, *ATTEMPT_FAILURES)):
            return self._retry_or_dead(job, exc, job.max_attempts, options.retry.delay(job.attempt))
        return Outcome(job, JobState.DEAD, error=failures.from_exception(exc, job.attempt, self.worker_id))

    def _retry_or_dead(self, job: ClaimedJob, exc: BaseException, max_attempts: int, delay: float) -> Outcome:
        error = failures.from_exception(exc, job.attempt, self.worker_id)
        if job.attempt >= max_attempts:
            return Outcome(job, JobState.DEAD, error=error)
        state = JobState.SCHEDULED if delay > 0 else JobState.AVAILABLE
        return Outcome(job, state, delay=max(0.0, delay), error=error)

    def settle(self, call: Call, result: Any = None, exc: BaseException | None = None) -> Outcome:
        """``conclude``, then tell the signals what became of the attempt."""
        return self.tell(call, Ran(self.conclude(call, result, exc), result, exc))

    def tell(self, call: Call, ran: Ran) -> Outcome:
        """Send the signals of a finished attempt (task_success, task_retry, task_failure, task_postrun);
        returns its outcome. Pools call it once they keep the outcome (not for an abandoned thread's)."""
        if hooks.watching_runs():
            hooks.after_run(call.task, call.request, ran.outcome, ran.result, ran.exc)
        return ran.outcome

    def run_sync(self, call: Call) -> Outcome:
        """Call a synchronous task in this thread, through the app's middleware, and tell the signals."""
        return self.tell(call, self.attempt_sync(call))

    def attempt_sync(self, call: Call) -> Ran:
        """Call a synchronous task in this thread (task_prerun first); the signals of its outcome are
        left to ``tell``."""
        task, request = call.task, call.request
        if signals.task_prerun.receivers:
            hooks.before_run(task, request)
        try:
            with request_context(request):
                if task.app.middleware:
                    result = hooks.sync_chain(task)(request)
                else:
                    result = task.run(request.args, request.kwargs)
        except (Exception, SystemExit) as exc:
            return Ran(self.conclude(call, exc=exc), exc=exc)
        return Ran(self.conclude(call, result), result)

    async def run_async(self, call: Call, timeout: float | None = None) -> Outcome:
        """Await an ``async def`` task through the app's middleware, and tell the signals."""
        return self.tell(call, await self.attempt_async(call, timeout))

    async def attempt_async(self, call: Call, timeout: float | None = None) -> Ran:
        """Await an ``async def`` task through the app's middleware; past ``timeout`` it is cancelled
        and the attempt fails. The signals of its outcome are left to ``tell``."""
        chain = hooks.async_chain(call.task)

        async def task() -> Any:
            try:
                return await chain(call.request)
            except asyncio.TimeoutError as exc:  # the task's own (on 3.11+ the same class as wait_for's)
                raise _RaisedByTask(exc) from exc

        if signals.task_prerun.receivers:
            hooks.before_run(call.task, call.request)
        try:
            with request_context(call.request):
                result = await asyncio.wait_for(task(), timeout)
        except _RaisedByTask as raised:
            return Ran(self.conclude(call, exc=raised.exc), exc=raised.exc)
        except asyncio.TimeoutError:
            limit_exc = TimeLimitExceeded(f"{call.task.name} ran past {timeout} s")
            return Ran(self.conclude(call, exc=limit_exc), exc=limit_exc)
        except (Exception, SystemExit) as exc:
            return Ran(self.conclude(call, exc=exc), exc=exc)
        return Ran(self.conclude(call, result), result)

    def is_async(self, call: Call) -> bool:
        """Whether the call's task is an ``async def`` (asked once per task, per job after that)."""
        fn = call.task.fn
        answer = self._async.get(fn)
        if answer is None:
            answer = self._async[fn] = inspect.iscoroutinefunction(fn)
        return answer
