"""``taskpg demo``: a self-contained tour. Enqueues a few hundred jobs, runs a worker, prints a summary.

Uses --dsn, TASKPG_DSN or DATABASE_URL when given (in its own schema, ``taskpg_demo``), else the embedded
Postgres, so it works on a machine with nothing but Python. It prints a short story: what it enqueued, a
progress bar while the worker drains them (on a terminal), a table of this run's jobs by state, and the
commands that look at them; the worker's own log lines (the planned failures) only with ``-l``.
"""

from __future__ import annotations

import random
import shlex
import sys
import time
from collections import Counter
from typing import IO

from . import embedded, migrate
from .app import TaskPG
from .dsn import configured_dsn, redact
from .worker import Worker

app = TaskPG(schema="taskpg_demo")
QUEUE = "demo"
#: Seconds the demo waits for its jobs before giving up.
DRAIN_TIMEOUT = 120.0
BAR_WIDTH = 30


@app.task(name="demo.resize_image", queue=QUEUE)
def resize_image(image_id: int, width: int) -> dict[str, int]:
    time.sleep(random.uniform(0.001, 0.01))  # pretend to do I/O
    return {"image_id": image_id, "width": width}


@app.task(
    name="demo.send_email",
    queue=QUEUE,
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


@app.task(name="demo.charge_card", queue=QUEUE)
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


class Progress:
    """A one-line bar, redrawn in place on a terminal; elsewhere only the line it ends with."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total, self.out = total, out
        self.live = out.isatty()

    def show(self, done: int) -> None:
        if self.live:
            filled = BAR_WIDTH * min(done, self.total) // max(self.total, 1)
            self.out.write(f"\rrunning  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{self.total}")
            self.out.flush()

    def end(self, line: str) -> None:
        self.out.write(("\r" + " " * (BAR_WIDTH + 30) + "\r" if self.live else "") + line + "\n")


def _finished() -> int:
    """Jobs of the demo's queue that have finished (succeeded or dead), whichever run made them."""
    counts = app.store.job_counts().get(QUEUE, {})
    return counts.get("succeeded", 0) + counts.get("dead", 0)


def run(
    jobs: int = 300, concurrency: int = 8, reset: bool = False, dsn: str | None = None, out: IO[str] = sys.stdout
) -> int:
    """Run the demo; returns a process exit code (2 when the schema is not the demo's). ``dsn`` is the
    --dsn given, if any (named in the printed commands)."""
    given = configured_dsn(dsn)
    where = redact(given) if given else f"the embedded Postgres in {embedded.default_data_dir()}"
    print(f"taskpg demo: schema {app.schema!r} on {where}", file=out)
    refusal = prepare(reset)
    if refusal is not None:
        print(f"taskpg demo: {refusal}", file=sys.stderr)
        return 2
    before = _finished()
    images = jobs * 2 // 3
    started = time.monotonic()
    handles = [resize_image.delay(0, 64)]
    ids = [i for i in resize_image.delay_many([(n, 640) for n in range(1, images)]) if i]
    emails = [send_email.delay(n) for n in range(jobs - images - 1)]
    declined = charge_card.delay(42)
    enqueued = 1 + len(ids) + len(emails) + 1
    print(
        f"enqueued {enqueued} jobs in {time.monotonic() - started:.2f} s: 1 by delay(), {len(ids)} by COPY, "
        f"{len(emails)} e-mails (every tenth fails once), 1 card charge that always fails",
        file=out,
    )

    started = time.monotonic()
    progress = Progress(enqueued, out)
    with Worker(app, queues=[QUEUE], concurrency=concurrency, grace=5).in_background():
        while (done := _finished() - before) < enqueued:
            progress.show(done)
            if time.monotonic() - started > DRAIN_TIMEOUT:
                raise TimeoutError(f"the demo's jobs did not finish within {DRAIN_TIMEOUT:.0f} s")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        progress.end(f"ran them in {elapsed:.2f} s: {enqueued / elapsed:.0f} jobs/s with {concurrency} threads")
        result = (emails or handles)[-1].get(timeout=10)
        failure = declined.get(timeout=10, propagate=False)

    this_run = [h.id for h in (*handles, *emails, declined)] + ids
    states = Counter(str((app.AsyncResult(i).record() or {}).get("state")) for i in this_run)
    retried = sum(1 for h in emails if (h.record() or {}).get("attempt", 0) > 1)
    notes = {"succeeded": f"{retried} e-mails on their second attempt", "dead": f"{type(failure).__name__}: {failure}"}
    print("\n  this run   jobs", file=out)
    for state, count in sorted(states.items(), key=lambda item: -item[1]):
        print(f"  {state:<10} {count:>4}   {notes.get(state, '')}".rstrip(), file=out)
    print(f"\na result: {result!r}\n", file=out)
    where_flags = f"--schema {app.schema}" + (f" --dsn {shlex.quote(redact(dsn))}" if dsn else "")
    for what, command in (
        ("look at the dead job", f"taskpg inspect {declined.id}"),
        ("list the dead jobs", "taskpg dead list"),
        ("every queue and state", "taskpg status"),
        ("the web dashboard", "taskpg dashboard"),
    ):
        print(f"{what + ':':<23}{command} {where_flags}", file=out)
    if dsn and redact(dsn) != dsn:
        print("(your --dsn, its password shown as ***)", file=out)
    app.close()
    return 0
