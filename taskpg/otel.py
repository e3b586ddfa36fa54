"""OpenTelemetry tracing (extra ``[otel]``): a producer span at enqueue, a consumer span per attempt,
linked by a W3C ``traceparent`` stored with the job, in the enqueue's own transaction.

``instrument(app)`` connects a ``before_task_publish`` receiver that opens a ``<task> publish`` span (kind
PRODUCER, child of the span current at the call, a web request's, say) and injects its context into the
job's headers, and adds a middleware (plain and ``async def``) that extracts it in the worker and runs the
attempt in a ``<task> process`` span (kind CONSUMER) with the job's attributes; an exception is recorded on
the span, which ends with an ERROR status. Call it once, in the module your app is defined in, before the
app runs jobs (the worker and its child processes import that module, so they are instrumented too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace

from . import signals

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: The instrumentation's name, as tracers report it.
TRACER_NAME = "taskpg"
_instrumented: set[int] = set()


def _attributes(request: Any) -> dict[str, Any]:
    return {
        "messaging.system": "taskpg",
        "messaging.destination.name": request.queue or "",
        "messaging.message.id": request.id or "",
        "taskpg.task": request.task or "",
        "taskpg.attempt": request.attempt,
    }


def _on_publish(sender: Any = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """before_task_publish: a PRODUCER span around the enqueue's start, its context into the headers."""
    if headers is None:
        return
    tracer = trace.get_tracer(TRACER_NAME)
    attributes = {
        "messaging.system": "taskpg",
        "messaging.destination.name": str(headers.get("queue", "")),
        "messaging.message.id": str(headers.get("id", "")),
        "taskpg.task": str(sender),
    }
    with tracer.start_as_current_span(f"{sender} publish", kind=trace.SpanKind.PRODUCER, attributes=attributes):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        headers.update(carrier)  # traceparent (and tracestate): stored with the job


def _consumer_span(request: Any) -> Any:
    parent = propagate.extract(dict(request.headers or {}))
    return trace.get_tracer(TRACER_NAME).start_as_current_span(
        f"{request.task} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=_attributes(request),
        record_exception=True,
        set_status_on_exception=True,
    )


def trace_run(call_next: Callable[[Any], Any], request: Any) -> Any:
    """Middleware for plain tasks: the attempt in a CONSUMER span whose parent is the enqueue's span, with
    ``taskpg.outcome`` set to ``succeeded`` or ``failed``."""
    with _consumer_span(request) as span:
        try:
            result = call_next(request)
        except BaseException:
            span.set_attribute("taskpg.outcome", "failed")
            raise
        span.set_attribute("taskpg.outcome", "succeeded")
        return result


async def trace_run_async(call_next: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    """Middleware for ``async def`` tasks (see ``trace_run``)."""
    with _consumer_span(request) as span:
        try:
            result = await call_next(request)
        except BaseException:
            span.set_attribute("taskpg.outcome", "failed")
            raise
        span.set_attribute("taskpg.outcome", "succeeded")
        return result


def instrument(app: Any) -> None:
    """Trace ``app``'s runs, and every enqueue of this process (the publish signal has no app: it is
    connected once); calling it again for the same app does nothing."""
    signals.before_task_publish.connect(_on_publish)  # connecting twice connects once
    if id(app) in _instrumented:
        return
    _instrumented.add(id(app))
    app.middleware = (trace_run, trace_run_async, *app.middleware)
