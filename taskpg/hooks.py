"""What runs around a job besides the task itself: the app's middleware, and the signals of enqueue
and execution (signals.py). Everything here costs one test when nothing is connected.

Middleware is a list of callables ``(call_next, request) -> result`` given to ``TaskPG(middleware=...)``.
The first wraps all the others; ``call_next(request)`` runs the rest and the task. Plain middleware wraps
plain tasks, ``async def`` middleware wraps ``async def`` tasks (there ``await call_next(request)``): an app
with both kinds of tasks lists a middleware of each kind.
"""

from __future__ import annotations

import functools
import inspect
import traceback
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import signals
from .job import JobState, status_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from .job import Outcome


class Hooked(Protocol):
    """What hooks need of a task: its name, its function and its app's middleware."""

    name: str

    @property
    def app(self) -> Any: ...

    def run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class ExceptionInfo:
    """Celery's ``einfo``: the exception, its type, its traceback object and the formatted text."""

    exception: BaseException
    type: type[BaseException]
    tb: Any
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> ExceptionInfo:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(exc, type(exc), exc.__traceback__, text)


# -- middleware ------------------------------------------------------------------------------------


def _middleware(task: Hooked) -> Sequence[Any]:
    return getattr(task.app, "middleware", ())


#: task -> its call through the middleware (an app's middleware is fixed when the app is made).
_chains: weakref.WeakKeyDictionary[Any, Callable[[Any], Any]] = weakref.WeakKeyDictionary()


def sync_chain(task: Hooked) -> Callable[[Any], Any]:
    """The call of a plain task through the app's plain middleware (built once per task)."""
    chain = _chains.get(task)
    if chain is None:

        def innermost(request: Any) -> Any:
            return task.run(request.args, request.kwargs)

        chain = innermost
        for middleware in reversed([m for m in _middleware(task) if not _is_async(m)]):
            chain = functools.partial(middleware, chain)
        _chains[task] = chain
    return chain


def async_chain(task: Hooked) -> Callable[[Any], Awaitable[Any]]:
    """The call of an ``async def`` task through the app's ``async def`` middleware (built once per task)."""
    chain = _chains.get(task)
    if chain is None:

        async def innermost(request: Any) -> Any:
            return await task.run(request.args, request.kwargs)

        chain = innermost
        for middleware in reversed([m for m in _middleware(task) if _is_async(m)]):
            chain = functools.partial(middleware, chain)
        _chains[task] = chain
    return chain


def _is_async(middleware: Any) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(middleware) or inspect.iscoroutinefunction(
        getattr(middleware, "__call__", None)  # noqa: B004 - the method itself is what is asked about
    )


# -- execution signals -----------------------------------------------------------------------------


def before_run(task: Hooked, request: Any) -> None:
    """task_prerun (the executor calls it only when a receiver is connected)."""
    signals.task_prerun.send(sender=task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs)


def watching_runs() -> bool:
    """Whether a receiver waits for what became of an attempt (then ``after_run`` has work)."""
    return (
        signals.task_postrun.receivers
        or signals.task_success.receivers
        or signals.task_failure.receivers
        or signals.task_retry.receivers
    )


def after_run(task: Hooked, request: Any, outcome: Outcome, result: Any, exc: BaseException | None) -> None:
    """task_success / task_retry / task_failure for the attempt's outcome, then task_postrun."""
    state = JobState(outcome.state)
    if state == JobState.SUCCEEDED:
        signals.task_success.send(sender=task, result=result)
    elif exc is not None and state == JobState.DEAD:
        signals.task_failure.send(
            sender=task,
            task_id=request.id,
            exception=exc,
            args=request.args,
            kwargs=request.kwargs,
            traceback=exc.__traceback__,
            einfo=ExceptionInfo.of(exc),
        )
    elif exc is not None and outcome.error is not None:  # failed, will run again
        reason = getattr(exc, "exc", None) or exc  # a Retry carries its cause
        signals.task_retry.send(sender=task, request=request, reason=reason, einfo=ExceptionInfo.of(reason))
    status = status_of(state, outcome.job.attempt - outcome.refund).value
    signals.task_postrun.send(
        sender=task,
        task_id=request.id,
        task=task,
        args=request.args,
        kwargs=request.kwargs,
        retval=result if exc is None else exc,
        state=status,
    )


def unknown_task(name: str, job_id: str, message: str, exc: BaseException) -> None:
    if signals.task_unknown.receivers:
        signals.task_unknown.send(sender=None, name=name, id=job_id, message=message, exc=exc)


# -- enqueue signals -------------------------------------------------------------------------------


def publishing() -> bool:
    """Whether an enqueue must build the publish signals' arguments."""
    return signals.before_task_publish.receivers or signals.after_task_publish.receivers


def headers(job_id: str, task: str, queue: str, eta: Any, countdown: float, priority: int, via: str) -> dict[str, Any]:
    """The publish signals' ``headers`` for one job."""
    return {
        "id": job_id,
        "task": task,
        "queue": queue,
        "eta": eta,
        "countdown": countdown,
        "priority": priority,
        "via": via,
    }


#: The keys taskpg puts in the publish signals' headers; any other key a receiver adds is stored with the job.
STANDARD_HEADERS = frozenset(("id", "task", "queue", "eta", "countdown", "priority", "via"))


def added_headers(header: dict[str, Any]) -> dict[str, Any]:
    """What ``before_task_publish`` receivers added to the headers (to store with the job)."""
    return {key: value for key, value in header.items() if key not in STANDARD_HEADERS}


def before_publish(header: dict[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    _publish(signals.before_task_publish, header, args, kwargs, properties={})


def after_publish(header: dict[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    _publish(signals.after_task_publish, header, args, kwargs)


def _publish(
    signal: signals.Signal, header: dict[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any], **extra: Any
) -> None:
    """A publish signal with Celery's arguments: the task's name as sender, ``(args, kwargs, {})`` as body."""
    signal.send(
        sender=header["task"],
        body=(tuple(args), dict(kwargs), {}),
        exchange="",
        routing_key=header["queue"],
        headers=header,
        **extra,
    )
