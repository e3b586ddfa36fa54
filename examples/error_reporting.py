"""Error reporting with job context, Sentry-style, built on middleware and signals.

A middleware reports every exception a task raises, with the job's id, task, queue and attempt, then lets it
go on (the job is retried or goes dead as usual). A ``task_failure`` receiver marks the reports of jobs that are
dead for good. Swap ``Reporter`` for your error tracker's client (``sentry_sdk.capture_exception`` inside
``sentry_sdk.new_scope()``, with the same tags).

    TASKPG_DSN=postgresql://postgres@127.0.0.1:5432/test python examples/error_reporting.py

With a real worker: ``taskpg worker -A examples.error_reporting``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from taskpg import TaskPG, Worker, signals


class Reporter:
    """Stands in for an error tracker: keeps each report (and prints it as one JSON line)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def capture(self, exc: BaseException, **tags: Any) -> None:
        report = {"error": f"{type(exc).__name__}: {exc}", **tags}
        with self._lock:
            self.reports.append(report)
        print(json.dumps(report, sort_keys=True))


reporter = Reporter()


def report_errors(call_next: Any, request: Any) -> Any:
    """Middleware: report what the task raised, with the job's context, and raise it on."""
    try:
        return call_next(request)
    except Exception as exc:
        reporter.capture(exc, job_id=request.id, task=request.task, queue=request.queue, attempt=request.attempt)
        raise


app = TaskPG(schema=os.environ.get("TASKPG_SCHEMA", "taskpg_errors"), middleware=[report_errors])


@signals.task_failure.connect
def dead_for_good(sender: Any = None, task_id: str | None = None, exception: Any = None, **kwargs: Any) -> None:
    reporter.capture(exception, job_id=task_id, task=getattr(sender, "name", None), final=True)


@app.task(autoretry_for=(ConnectionError,), max_retries=1, retry_backoff=0.1, retry_jitter=False)
def charge(order: int) -> str:
    if order % 2:
        raise ConnectionError(f"payment service down for order {order}")
    return f"charged {order}"


def main() -> None:
    app.migrate()
    ok, failing = charge.delay(2), charge.delay(3)
    with Worker(app, concurrency=2, grace=5).in_background():
        print("order 2:", ok.get(timeout=30))
        print("order 3:", repr(failing.get(timeout=30, propagate=False)))
    attempts = [r["attempt"] for r in reporter.reports if r.get("job_id") == failing.id and "attempt" in r]
    finals = [r for r in reporter.reports if r.get("final")]
    print(f"reported: {len(attempts)} failed attempt(s) of job {failing.id}, {len(finals)} dead job(s)")
    app.close()


if __name__ == "__main__":
    main()
