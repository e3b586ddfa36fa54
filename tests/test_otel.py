"""docs/tracing.md: a trace that starts in a web request continues into the job, through Postgres."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskpg import TaskPG, otel, signals

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_PROVIDER)  # once per process: OpenTelemetry allows one global provider


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    signals.before_task_publish.disconnect(otel._on_publish)  # instrument() connected it for this test


@pytest.mark.parametrize("pool", ["threads", "async"])
def test_a_traceparent_set_at_enqueue_is_the_parent_of_the_consumer_span(
    pg_dsn: str, migrated_schema: str, run_worker: Any, spans: InMemorySpanExporter, db: psycopg.Connection, pool: str
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema)
    otel.instrument(app)

    @app.task(name="otel.plain")
    def plain(x: int) -> int:
        return x + 1

    @app.task(name="otel.coro", max_retries=0)
    async def coro(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 2

    tracer = trace.get_tracer("the-web-app")
    with tracer.start_as_current_span("POST /orders") as request_span:
        handles = [plain.delay(1), coro.delay(2), coro.delay(-1)]
    stored = dict(db.execute(f'SELECT id::text, headers FROM "{migrated_schema}".jobs').fetchall())
    assert all(h["traceparent"].startswith("00-") for h in stored.values())  # in the job's row
    with run_worker(app, pool=pool):
        assert handles[0].get(timeout=10) == 2 and handles[1].get(timeout=10) == 4
        handles[2].get(timeout=10, propagate=False)
    # Spans by (name, job id): two jobs of otel.coro finish in either order.
    finished = {(s.name, (s.attributes or {}).get("messaging.message.id")): s for s in spans.get_finished_spans()}
    trace_id = request_span.get_span_context().trace_id
    for task, handle in (("otel.plain", handles[0]), ("otel.coro", handles[1]), ("otel.coro", handles[2])):
        producer, consumer = finished[(f"{task} publish", handle.id)], finished[(f"{task} process", handle.id)]
        assert producer.kind == trace.SpanKind.PRODUCER and consumer.kind == trace.SpanKind.CONSUMER
        assert producer.parent is not None and producer.parent.span_id == request_span.get_span_context().span_id
        assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
        assert producer.context.trace_id == consumer.context.trace_id == trace_id
        assert consumer.attributes is not None and consumer.attributes["taskpg.task"] == task
    failed = [s for s in spans.get_finished_spans() if s.name == "otel.coro process" and not s.status.is_ok]
    assert len(failed) == 1 and failed[0].events[0].name == "exception"
    assert failed[0].attributes is not None and failed[0].attributes["taskpg.outcome"] == "failed"
    plain_span = finished[("otel.plain process", handles[0].id)]
    assert plain_span.attributes is not None and plain_span.attributes["taskpg.outcome"] == "succeeded"
    assert failed[0].attributes is not None and failed[0].attributes["messaging.message.id"] == handles[2].id
    app.close()


def test_headers_travel_through_the_buffer(buffered_app: TaskPG, run_worker: Any, spans: InMemorySpanExporter) -> None:
    from taskpg.flusher import Flusher

    otel.instrument(buffered_app)

    @buffered_app.task(name="otel.buffered")
    def buffered(x: int) -> int:
        return x

    with trace.get_tracer("t").start_as_current_span("webhook") as outer:
        handle = buffered.apply_async((7,), via="buffer")
    Flusher(buffered_app).drain()
    with run_worker(buffered_app):
        assert handle.get(timeout=10) == 7
    consumer = next(s for s in spans.get_finished_spans() if s.name == "otel.buffered process")
    assert consumer.context.trace_id == outer.get_span_context().trace_id
