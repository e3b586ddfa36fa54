"""``taskpg demo``: a self-contained tour. Enqueues a few hundred jobs, runs a worker, prints a summary.

Uses TASKPG_DSN / DATABASE_URL when set (in its own schema, ``taskpg_demo``), else the embedded
Postgres, so it works on a machine with nothing but Python.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter

from . import migrate
from .app import TaskPG
from .dsn import configured_dsn, redact
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


def prepare(reset: bool) -> str | None:
    """Make the demo's schema ready; returns why it must not be used (a schema it did not create)."""
    revision = migrate.current(app.dsn, app.schema)
    if revision is not None and not app.store.is_demo_schema():
        return (
            f"schema {app.schema!r} holds a taskpg queue that taskpg demo did not create: the demo never touches it; "
            "run it on its own schema (the default, taskpg_demo, or --schema NEW)"
        )
    if revision is not None and reset:
        migrate.downgrade(app.dsn, app.schema, "base")  # a demo schema, asked for: start from empty tables
    app.migrate()
    app.store.mark_demo_schema()
    return None


def run(jobs: int = 300, concurrency: int = 8, reset: bool = False) -> int:
    """Run the demo; returns a process exit code (2 when the schema is not the demo's)."""
    where = "the embedded Postgres" if configured_dsn() is None else redact(app.dsn)
    print(f"taskpg demo: schema {app.schema!r} on {where}")
    refusal = prepare(reset)
    if refusal is not None:
        print(f"taskpg demo: {refusal}", file=sys.stderr)
        return 2
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

    this_run = [h.id for h in (*handles, *emails, declined)] + ids
    counts = dict(Counter(str((app.AsyncResult(i).info() or {}).get("state")) for i in this_run))
    retried = sum(1 for h in emails if (h.info() or {}).get("attempt", 0) > 1)
    print(f"worker ran them in {elapsed:.2f} s ({enqueued / elapsed:.0f} jobs/s, {concurrency} threads)")
    print(f"job states: {counts}")
    print(f"emails that succeeded after a retry: {retried}")
    print(f"a result: {results[-1]!r}")
    print(f"the failed job raised: {failure}")
    print(f"inspect the failed job: taskpg inspect {declined.id} --schema {app.schema}")
    print(f"list dead jobs:         taskpg dead list --schema {app.schema}")
    app.close()
    return 0
