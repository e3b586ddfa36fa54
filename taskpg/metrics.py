"""Prometheus metrics in the text exposition format (version 0.0.4), with no dependency.

``WorkerMetrics`` counts what one worker process does (``taskpg worker --metrics-port N`` serves it):
jobs started, succeeded, failed, retried, dead and snoozed per task and queue, histograms of run time
and of the lag from due to start, and gauges of jobs running and prefetched. ``queue_metrics`` renders
the queue depths the database holds (``taskpg metrics --port N``). ``serve`` answers ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import http.server
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from .job import JobState

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from .job import ClaimedJob, Outcome
    from .store import QueueDepth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds: from a millisecond no-op to a five-minute job.
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Seconds from when a job was due (its run_at) to its start.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)
Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: Labels) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Histogram:
    """Observations per label set, in cumulative buckets, with their sum and count."""

    def __init__(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self._values: dict[Labels, tuple[list[int], list[float]]] = {}  # per-bucket counts, [sum]
        self._lock = threading.Lock()

    def observe(self, labels: Labels, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._values.setdefault(labels, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((labels, (list(c), t[0])) for labels, (c, t) in self._values.items())
        for labels, (counts, total) in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {running}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(total)}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {running}"


class Gauge:
    """Values read when scraped: ``read()`` returns label values -> value."""

    def __init__(self, name: str, help: str, labels: Sequence[str], read: Callable[[], dict[Labels, float]]) -> None:
        self.name, self.help, self.label_names, self.read = name, help, tuple(labels), read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in sorted(self.read().items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


def render(metrics: Iterable[Counter | Histogram | Gauge]) -> str:
    return "\n".join(line for metric in metrics for line in metric.render()) + "\n"


class WorkerMetrics:
    """What one worker process did, per task and queue (see the module docstring)."""

    def __init__(self, in_flight: Callable[[], int] = lambda: 0, prefetched: Callable[[], int] = lambda: 0) -> None:
        labels = ("task", "queue")
        self.started = Counter("taskpg_jobs_started_total", "Attempts started.", labels)
        self.succeeded = Counter("taskpg_jobs_succeeded_total", "Attempts that succeeded.", labels)
        self.failed = Counter("taskpg_jobs_failed_total", "Attempts that failed (retried or dead).", labels)
        self.retried = Counter("taskpg_jobs_retried_total", "Failed attempts whose job will run again.", labels)
        self.dead = Counter("taskpg_jobs_dead_total", "Jobs that went dead here (ran or not).", labels)
        self.snoozed = Counter("taskpg_jobs_snoozed_total", "Attempts that snoozed.", labels)
        self.run_time = Histogram("taskpg_job_run_seconds", "How long attempts ran.", labels, RUN_BUCKETS)
        self.lag = Histogram(
            "taskpg_job_lag_seconds", "From when a job was due (run_at) to its start.", labels, LAG_BUCKETS
        )
        self.in_flight = Gauge(
            "taskpg_worker_jobs_in_flight", "Jobs this worker is running.", (), lambda: {(): float(in_flight())}
        )
        self.prefetched = Gauge(
            "taskpg_worker_jobs_prefetched",
            "Jobs this worker claimed and has not started yet.",
            (),
            lambda: {(): float(prefetched())},
        )

    def job_started(self, job: ClaimedJob) -> None:
        labels = (job.task, job.queue)
        self.started.inc(labels)
        self.lag.observe(labels, max(0.0, time.time() - job.run_at.timestamp()))

    def job_finished(self, outcome: Outcome, seconds: float | None) -> None:
        job = outcome.job
        labels = (job.task, job.queue)
        state = JobState(outcome.state)
        if seconds is not None:
            self.run_time.observe(labels, seconds)
        if state == JobState.SUCCEEDED:
            self.succeeded.inc(labels)
        elif state == JobState.DEAD:
            self.dead.inc(labels)
            if seconds is not None:
                self.failed.inc(labels)
        elif outcome.snoozed:
            self.snoozed.inc(labels)
        elif outcome.error is not None and not outcome.refund:
            self.failed.inc(labels)
            self.retried.inc(labels)

    def render(self) -> str:
        return render(
            [
                self.started,
                self.succeeded,
                self.failed,
                self.retried,
                self.dead,
                self.snoozed,
                self.run_time,
                self.lag,
                self.in_flight,
                self.prefetched,
            ]
        )


def queue_metrics(depths: Sequence[QueueDepth]) -> str:
    """The queues' depths, as ``taskpg metrics`` serves them."""
    jobs = Gauge(
        "taskpg_queue_jobs",
        "Jobs per queue and state (available, scheduled, running, dead).",
        ("queue", "state"),
        lambda: {(d.queue, d.state): float(d.count) for d in depths},
    )
    oldest = Gauge(
        "taskpg_queue_oldest_available_seconds",
        "Age of the queue's oldest available job (how long it has been due).",
        ("queue",),
        lambda: {(d.queue,): d.oldest_seconds for d in depths if d.oldest_seconds is not None},
    )
    return render([jobs, oldest])


class _Handler(http.server.BaseHTTPRequestHandler):
    page: Callable[[], str]
    timeout = 10  # seconds a connection may stay idle: a stalled client does not pin a thread for ever

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = type(self).page().encode()
        except Exception as exc:  # the database is away, say: a scrape error, not a dead server
            self.send_error(503, f"metrics unavailable: {exc}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # a scrape every 15 s is not news


def serve(page: Callable[[], str], host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve ``GET /metrics`` from a daemon thread; ``shutdown()`` the returned server to stop it."""
    handler = type("MetricsHandler", (_Handler,), {"page": staticmethod(page)})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="taskpg-metrics", daemon=True).start()
    return server
