"""``taskpg demo``: a self-contained tour. Enqueues a few hundred jobs, runs a worker, prints a summary.

Uses TASKPG_DSN / DATABASE_URL when set (in its own schema, ``taskpg_demo``), else the embedded
Postgres, so it works on a machine with nothing but Python.
"""

from __future__ import annotations

import random
import time

from . import migrate
from .app import TaskPG
from .dsn import configured_dsn, redact
from .ops import job_counts
from .worker import Worker

app = TaskPG(schema="taskpg_demo")


@app.task(name="demo.resize_image", queue="demo")
def resize_image(image_id: int, width: int) -> dict[str, int]:
    time.sleep(random.uniform(0.001, 0.01))  # pretend to do I/O
    return {"image_id": image_id, "width": width}


@app.task(
    name="demo.send_email",
    queue="demo",
    autoretry_for=(ConnectionError,),
    max_retries=3,
    retry_backoff=0.05,
    retry_jitter=False,
    bind=True,
)
def send_email(self: object, user_id: int) -> str:
    request = send_email.request
    if user_id % 10 == 0 and request.attempt < 2:  # every tenth email fails once, then succeeds
        raise ConnectionError("SMTP server busy")
    return f"sent to user {user_id} on attempt {request.attempt}"


@app.task(name="demo.charge_card", queue="demo")
def charge_card(order_id: int) -> None:
    raise ValueError(f"card declined for order {order_id}")


def run(jobs: int = 300, concurrency: int = 8) -> int:
    """Run the demo; returns a process exit code."""
    where = "the embedded Postgres" if configured_dsn() is None else redact(app.dsn)
    print(f"taskpg demo: schema {app.schema!r} on {where}")
    migrate.downgrade(app.dsn, app.schema, "base")  # start from empty tables
    app.migrate()
    images = jobs * 2 // 3
    started = time.monotonic()
    handles = [resize_image.delay(0, 64)]
    ids = [i for i in resize_image.delay_many([(n, 640) for n in range(1, images)]) if i]
    emails = [send_email.delay(n) for n in range(jobs - images - 1)]
    declined = charge_card.delay(42)
    enqueued = 1 + len(ids) + len(emails) + 1
    print(
        f"enqueued {enqueued} jobs in {time.monotonic() - started:.2f} s (1 delay, {len(ids)} by COPY, "
        f"{len(emails)} emails, 1 card charge that will fail)"
    )

    started = time.monotonic()
    with Worker(app, queues=["demo"], concurrency=concurrency, grace=5).in_background():
        results = [h.get(timeout=60) for h in handles + emails]
        try:
            declined.get(timeout=60)
        except ValueError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        for job_id in ids:
            app.AsyncResult(job_id).get(timeout=60)
        elapsed = time.monotonic() - started

    counts = job_counts(app.store).get("demo", {})
    retried = sum(1 for h in emails if (h.info() or {}).get("attempt", 0) > 1)
    print(f"worker ran them in {elapsed:.2f} s ({enqueued / elapsed:.0f} jobs/s, {concurrency} threads)")
    print(f"job states: {counts}")
    print(f"emails that succeeded after a retry: {retried}")
    print(f"a result: {results[-1]!r}")
    print(f"the failed job raised: {failure}")
    print("inspect one with `taskpg inspect ID`, list failures with `taskpg dead list`")
    app.close()
    return 0
