"""docs/retries-and-dead-letters.md: autoretry, backoff, retry(), snoozes, Reject, dead letters, ``taskpg dead``."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from support.rows import job_row, jobs_by_id
from support.waiting import wait_for

from taskpg import Reject, Snooze, TaskPG
from taskpg.exceptions import TaskError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import SimpleNamespace

    import psycopg


def test_autoretry_with_backoff_then_dead(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(ConnectionError,), max_retries=3, retry_backoff=0.2, retry_jitter=False)
    def flaky() -> None:
        raise ConnectionError("upstream down")

    with run_worker(app):
        handle = flaky.delay()
        with pytest.raises(ConnectionError, match="upstream down"):
            handle.get(timeout=20)
    stored = job_row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 4)
    errors = stored["errors"]
    assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
    assert all(e["type"] == "ConnectionError" and "upstream down" in e["traceback"] for e in errors)
    times = [dt.datetime.fromisoformat(e["at"]) for e in errors]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert expected <= gap < expected + 0.8, gaps


def test_unlisted_exception_fails_at_once_like_celery(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(ConnectionError,), max_retries=5)
    def broken() -> None:
        raise KeyError("missing")

    with run_worker(app):
        handle = broken.delay()
        with pytest.raises(KeyError):
            handle.get(timeout=10)
    assert job_row(db, app, handle.id)["attempt"] == 1


def test_bound_retry_with_countdown_and_max_retries(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    attempts: list[int] = []

    @app.task(bind=True, max_retries=10)
    def polite(self: Any, x: int) -> int:
        attempts.append(self.request.attempt)
        if self.request.attempt < 3:
            raise self.retry(countdown=0.1, exc=RuntimeError("not yet"))
        return x * self.request.retries

    @app.task(bind=True, max_retries=10)
    def capped(self: Any) -> None:
        raise self.retry(countdown=0, exc=RuntimeError("give up"), max_retries=1)

    with run_worker(app):
        assert polite.delay(5).get(timeout=10) == 10
        handle = capped.delay()
        with pytest.raises(RuntimeError, match="give up"):
            handle.get(timeout=10)
    assert attempts == [1, 2, 3]
    assert job_row(db, app, handle.id)["attempt"] == 2


def test_snooze_spends_no_attempt_and_is_capped(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    runs: list[int] = []

    @app.task(max_retries=0)
    def waits_twice(key: str) -> str:
        runs.append(1)
        if len(runs) <= 2:
            raise Snooze(0.1)
        return key

    @app.task(bind=True, max_snoozes=3)
    def forever(self: Any) -> None:
        self.snooze(0)

    with run_worker(app):
        handle = waits_twice.delay("done")
        assert handle.get(timeout=10) == "done"
        looping = forever.delay()
        with pytest.raises(TaskError, match="snoozed 3 times"):
            looping.get(timeout=10)
    stored = job_row(db, app, handle.id)
    assert (stored["attempt"], stored["snoozes"], stored["errors"]) == (1, 2, [])
    assert job_row(db, app, looping.id)["errors"][-1]["type"] == "TooManySnoozes"


def test_reject_goes_dead_at_once(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(autoretry_for=(Exception,), max_retries=5)
    def refuses() -> None:
        raise Reject("malformed order")

    with run_worker(app):
        handle = refuses.delay()
        with pytest.raises(Reject, match="malformed order"):
            handle.get(timeout=10)
    stored = job_row(db, app, handle.id)
    assert (stored["state"], stored["attempt"]) == ("dead", 1)


def test_dead_letter_queue_gets_a_copy_with_history(app: TaskPG, run_worker: Any, db: psycopg.Connection) -> None:
    @app.task(dead_letter="payments_dead", autoretry_for=(ValueError,), max_retries=1, retry_backoff=0.05)
    def charge(order: int) -> None:
        raise ValueError(f"declined {order}")

    with run_worker(app):
        handle = charge.delay(7)
        handle.get(timeout=10, propagate=False)
    copies = db.execute(
        f'SELECT task, args, state, attempt, errors FROM "{app.schema}".jobs WHERE queue = %s', ("payments_dead",)
    ).fetchall()
    assert len(copies) == 1
    task, args, state, attempt, errors = copies[0]
    assert (task, args, state, attempt) == (charge.name, [7], "available", 0)
    assert [e["message"] for e in errors] == ["declined 7", "declined 7"]
    assert job_row(db, app, handle.id)["state"] == "dead"


def test_dead_letter_handler_task_receives_the_job(app: TaskPG, run_worker: Any) -> None:
    received: list[dict[str, Any]] = []

    @app.task(name="on_dead")
    def on_dead(job: dict[str, Any]) -> None:
        received.append(job)

    @app.task(dead_letter="on_dead")
    def explode(x: int) -> None:
        raise RuntimeError(f"boom {x}")

    with run_worker(app):
        handle = explode.delay(3)
        handle.get(timeout=10, propagate=False)
        wait_for(lambda: len(received) == 1, message="dead-letter handler")
    job = received[0]
    assert (job["id"], job["task"], job["args"]) == (handle.id, explode.name, [3])
    assert job["errors"][-1]["message"] == "boom 3"


def insert_raw(db: psycopg.Connection, app: TaskPG, task: str, args: str, kwargs: str = "{}") -> str:
    from taskpg.job import new_job_id

    job_id = new_job_id()
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, args, kwargs, state) '
        "VALUES (%s, %s, 'default', %s::jsonb, %s::jsonb, 'available')",
        (job_id, task, args, kwargs),
    )
    return job_id


def test_bad_jobs_go_dead_with_a_reason_and_the_worker_keeps_going(
    pg_dsn: str, migrated_schema: str, run_worker: Any, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=200)

    @app.task
    def takes_two(a: int, b: int) -> int:
        return a + b

    bad = {
        "unknown": insert_raw(db, app, "no.such.task", "[]"),
        "not a list": insert_raw(db, app, takes_two.name, '{"a": 1}'),
        "mismatch": insert_raw(db, app, takes_two.name, "[1, 2, 3]"),
        "too large": insert_raw(db, app, takes_two.name, "[" + ",".join(["1"] * 200) + "]"),
    }
    with run_worker(app):
        for job_id in bad.values():
            app.AsyncResult(job_id).get(timeout=10, propagate=False)
        assert takes_two.delay(1, 2).get(timeout=10) == 3  # still running fine
    reasons = {name: job_row(db, app, job_id)["errors"][-1] for name, job_id in bad.items()}
    assert {name: r["type"] for name, r in reasons.items()} == {
        "unknown": "NotRegistered",
        "not a list": "PayloadDecodeError",
        "mismatch": "ArgumentMismatch",
        "too large": "PayloadTooLarge",
    }
    assert "no.such.task" in reasons["unknown"]["message"]
    assert "too many positional arguments" in reasons["mismatch"]["message"]
    assert all(job_row(db, app, job_id)["state"] == "dead" for job_id in bad.values())
    app.close()


def test_a_worker_does_not_fetch_arguments_far_over_its_limit(
    pg_dsn: str, migrated_schema: str, run_worker: Any, db: psycopg.Connection
) -> None:
    big = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=20_000_000)  # a producer with a higher limit
    app = TaskPG(pg_dsn, schema=migrated_schema, max_payload_bytes=1_000_000)

    @big.task(name="reports.build")
    def build_big(blob: str) -> int:
        return len(blob)

    @app.task(name="reports.build")
    def build(blob: str) -> int:
        return len(blob)

    blob = "".join(chr(0x41 + n % 26) for n in range(3_000_000))
    over = build_big.delay(blob)
    under = build_big.delay("x" * 900_000)
    claimed = {job.id: job for job in app.store.claim(["default"], 10, "w-size", app.max_payload_bytes)}
    assert (claimed[over.id].args, claimed[over.id].kwargs) == ("[]", "{}")  # never sent to the worker
    assert claimed[over.id].oversize == 3_000_006  # its text: args ["..."] and kwargs {}
    assert claimed[under.id].oversize == 0 and len(claimed[under.id].args) == 900_004
    db.execute(f"""UPDATE "{app.schema}".jobs SET state = 'available', attempt = 0, worker_id = NULL""")
    with run_worker(app):
        assert type(over.get(timeout=10, propagate=False)).__name__ == "PayloadTooLarge"
        assert under.get(timeout=10) == 900_000
    error = job_row(db, app, over.id)["errors"][-1]
    assert error["message"] == (
        "arguments take 3000006 bytes (as stored in Postgres; not fetched), over the limit of 1000000"
    )
    assert job_row(db, app, over.id)["args"] == [blob]  # kept: raise the limit and retry it
    big.close()
    app.close()


def test_a_failing_job_in_its_dead_letter_queue_is_not_copied_again(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    @app.task(dead_letter="failures")
    def broken() -> None:
        raise RuntimeError("always")

    with run_worker(app, queues=["default", "failures"]):
        broken.delay().get(timeout=10, propagate=False)
        time.sleep(1.0)  # the copy in "failures" runs and dies too
    rows = db.execute(f'SELECT queue, state FROM "{app.schema}".jobs ORDER BY created_at').fetchall()
    assert rows == [("default", "dead"), ("failures", "dead")]


# -- taskpg dead list / retry / purge ------------------------------------------------------------------


def test_dead_list_shows_dead_jobs_with_their_last_error(
    cli: Callable[..., SimpleNamespace], app: TaskPG, mixed: SimpleNamespace
) -> None:
    result = cli(app.schema, "dead", "list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split()[:4] == ["id", "task", "queue", "attempts"]
    assert len(lines) == 1 + len(mixed.dead), result.out
    for job_id, task, queue, error in [
        (mixed.boom[0], "cli.boom", "default", "ValueError: boom 0"),
        (mixed.boom[1], "cli.boom", "other", "ValueError: boom 1"),
        (mixed.bust, "cli.bust", "default", "ValueError: bust 2"),
    ]:
        [line] = [line for line in lines if line.startswith(job_id)]
        assert line.split()[1:4] == [task, queue, "1"] and line.endswith(error), line
    assert mixed.succeeded not in result.out and mixed.available not in result.out

    result = cli(app.schema, "dead", "list", "--task", "cli.bust")
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == [mixed.bust]


def test_dead_list_escapes_control_characters(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection
) -> None:
    """A task name or message stored by another producer cannot drive the operator's terminal."""
    error = {"type": "ValueError", "message": "red\x1b[31m\nforged line", "attempt": 1}
    db.execute(
        f"""INSERT INTO "{app.schema}".jobs (id, task, queue, state, attempt, errors, finished_at)
            VALUES (gen_random_uuid(), %s, 'default', 'dead', 1, %s, now())""",
        ("evil\x1b[2J", json.dumps([error])),
    )
    result = cli(app.schema, "dead", "list")
    assert result.code == 0
    assert "\x1b" not in result.out and len(result.out.splitlines()) == 2, result.out
    assert "evil\\x1b[2J" in result.out and "red\\x1b[31m\\nforged line" in result.out


def test_dead_retry_by_id_makes_the_job_available_and_keeps_its_errors(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    before = jobs_by_id(db, app.schema)
    job_id = mixed.boom[0]
    result = cli(app.schema, "dead", "retry", job_id)
    assert result.code == 0 and "1 dead job(s) made available again" in result.out, result.out

    after = jobs_by_id(db, app.schema)
    row = after[job_id]
    assert (row["state"], row["attempt"], row["finished_at"], row["worker_id"]) == ("available", 0, None, None)
    assert row["errors"] == before[job_id]["errors"] and row["errors"][0]["message"] == "boom 0"
    others = {i: r["state"] for i, r in after.items() if i != job_id}
    assert others == {i: r["state"] for i, r in before.items() if i != job_id}, "other jobs changed"

    result = cli(app.schema, "dead", "retry", mixed.succeeded)  # not dead: left alone
    assert "0 dead job(s)" in result.out
    assert jobs_by_id(db, app.schema)[mixed.succeeded]["state"] == "succeeded"


def test_dead_retry_all_of_one_task(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    result = cli(app.schema, "dead", "retry", "--all", "--task", "cli.boom")
    assert result.code == 0 and "2 dead job(s) made available again" in result.out, result.out
    rows = jobs_by_id(db, app.schema)
    for job_id in mixed.boom:
        assert (rows[job_id]["state"], rows[job_id]["attempt"], len(rows[job_id]["errors"])) == ("available", 0, 1)
    assert rows[mixed.bust]["state"] == "dead"
    assert rows[mixed.succeeded]["state"] == "succeeded"


def test_dead_retry_without_ids_or_all_is_refused(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    before = jobs_by_id(db, app.schema)
    with pytest.raises(SystemExit, match="--all"):
        cli(app.schema, "dead", "retry")
    with pytest.raises(SystemExit, match="--all"):
        cli(app.schema, "dead", "retry", "--task", "cli.boom")
    assert jobs_by_id(db, app.schema) == before


def test_dead_purge_deletes_only_dead_jobs_and_needs_an_age(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    everything = set(jobs_by_id(db, app.schema))
    with pytest.raises(SystemExit, match="--older-than"):
        cli(app.schema, "dead", "purge")
    assert set(jobs_by_id(db, app.schema)) == everything

    result = cli(app.schema, "dead", "purge", "--older-than", "1h")  # they died just now
    assert result.code == 0 and "0 dead job(s) deleted" in result.out, result.out
    assert set(jobs_by_id(db, app.schema)) == everything

    result = cli(app.schema, "dead", "purge", "--older-than", "soon")
    assert result.code == 2 and "not a duration" in result.err, result.err

    result = cli(app.schema, "dead", "purge", "--older-than", "0s")
    assert result.code == 0 and f"{len(mixed.dead)} dead job(s) deleted" in result.out, result.out
    remaining = jobs_by_id(db, app.schema)
    assert set(remaining) == everything - set(mixed.dead)
    assert {i: r["state"] for i, r in remaining.items()} == {
        mixed.succeeded: "succeeded",
        mixed.available: "available",
    }
