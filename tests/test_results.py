"""Handles: status names, get() woken by NOTIFY, rebuilt errors, revoke, AsyncResult(id)."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import pytest
from support.waiting import wait_for

from taskpg import TaskPG, TaskRevoked, TimeoutError
from taskpg import result as result_module
from taskpg.exceptions import TaskError
from taskpg.failures import from_exception

if TYPE_CHECKING:
    import psycopg


def finish(
    db: psycopg.Connection,
    app: TaskPG,
    job_id: str,
    state: str,
    *,
    result: Any = None,
    error: dict[str, Any] | None = None,
    attempt: int = 1,
) -> None:
    """Write an outcome the way a worker does (row update + done notification)."""
    errors = json.dumps([error] if error else [])
    db.execute(
        f'UPDATE "{app.schema}".jobs SET state = %s, attempt = %s, result = %s::jsonb, errors = %s::jsonb, '
        "finished_at = now() WHERE id = %s",
        (state, attempt, json.dumps(result), errors, job_id),
    )
    db.execute("SELECT pg_notify(%s, %s)", (app.store.q.done_channel, job_id))


@pytest.fixture
def noop(app: TaskPG):  # type: ignore[no-untyped-def]
    @app.task
    def noop(x: int = 0) -> int:
        return x

    return noop


def test_status_names_follow_celery(app: TaskPG, noop, db: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    handle = noop.delay()
    assert (handle.status, handle.ready()) == ("PENDING", False)
    db.execute(f'UPDATE "{app.schema}".jobs SET state = %s, attempt = 1 WHERE id = %s', ("running", handle.id))
    assert handle.status == "STARTED"
    db.execute(f'UPDATE "{app.schema}".jobs SET state = %s WHERE id = %s', ("scheduled", handle.id))
    assert handle.status == "RETRY"
    finish(db, app, handle.id, "succeeded", result={"ok": [1, 2]})
    assert (handle.status, handle.ready(), handle.successful(), handle.result) == (
        "SUCCESS",
        True,
        True,
        {"ok": [1, 2]},
    )


def test_get_is_woken_by_notify_not_by_polling(
    app: TaskPG, noop, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # With the safety re-check an hour away, only the completion's NOTIFY can end get() in time.
    monkeypatch.setattr(result_module, "SAFETY_RECHECK_SECONDS", 3600.0)
    handle = noop.delay(5)
    threading.Timer(0.3, finish, args=(db, app, handle.id, "succeeded"), kwargs={"result": 5}).start()
    assert handle.get(timeout=10) == 5


def test_get_times_out(app: TaskPG, noop, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The timeout ends the wait, not the (here hour-long) safety re-check.
    monkeypatch.setattr(result_module, "SAFETY_RECHECK_SECONDS", 3600.0)
    handle = noop.delay()
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            handle.get(timeout=0.3)
        except BaseException as exc:
            raised.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(30)
    assert not waiter.is_alive(), "get(timeout=0.3) kept waiting"
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError) and handle.id in str(raised[0])


def test_get_raises_the_task_error_with_type_and_message(app: TaskPG, noop, db: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    handle = noop.delay()
    try:
        raise ValueError("card declined")
    except ValueError as exc:
        finish(db, app, handle.id, "dead", error=from_exception(exc, attempt=1))
    with pytest.raises(ValueError, match="card declined") as caught:
        handle.get(timeout=5)
    assert "raise ValueError" in caught.value.remote_traceback  # type: ignore[attr-defined]
    assert handle.status == "FAILURE" and handle.failed()
    assert isinstance(handle.get(timeout=5, propagate=False), ValueError)
    assert isinstance(handle.result, ValueError)


def test_unknown_error_types_are_rebuilt_without_importing(app: TaskPG, noop, db: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    handle = noop.delay()
    error = {
        "type": "PaymentGatewayDown",
        "module": "some.module.never.imported",
        "message": "503",
        "traceback": None,
        "attempt": 1,
    }
    finish(db, app, handle.id, "dead", error=error)
    with pytest.raises(TaskError, match="503") as caught:
        handle.get(timeout=5)
    assert type(caught.value).__name__ == "PaymentGatewayDown"
    assert type(caught.value).__module__ == "some.module.never.imported"
    import sys

    assert "some.module.never.imported" not in sys.modules


def test_revoke_cancels_only_jobs_not_started(app: TaskPG, noop, db: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    waiting, running = noop.delay(), noop.delay()
    db.execute(f'UPDATE "{app.schema}".jobs SET state = %s, attempt = 1 WHERE id = %s', ("running", running.id))
    assert waiting.revoke() is True
    assert waiting.revoke() is False  # already cancelled
    assert running.revoke() is False
    assert (waiting.status, running.status) == ("REVOKED", "STARTED")
    with pytest.raises(TaskRevoked):
        waiting.get(timeout=5)


def test_async_result_rebuilds_a_handle_from_an_id(app: TaskPG, noop, db: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    handle = noop.delay(3)
    again = app.AsyncResult(handle.id)
    assert again == handle and again.status == "PENDING"
    finish(db, app, handle.id, "succeeded", result=3)
    assert again.get(timeout=5) == 3
    assert app.AsyncResult("01a20406-0000-7000-8000-000000000000").status == "PENDING"


def test_update_state_reports_progress_while_the_job_runs(app: TaskPG, run_worker: Any) -> None:
    halfway, release = threading.Event(), threading.Event()

    @app.task(name="results.report", bind=True)
    def report(self: Any, total: int) -> str:
        assert self.update_state(state="PROGRESS", meta={"done": total // 2, "total": total})
        halfway.set()
        release.wait(10)
        return "done"

    handle = report.delay(10)
    assert handle.status == "PENDING" and handle.info is None
    with run_worker(app):
        assert halfway.wait(10)
        wait_for(lambda: handle.status == "PROGRESS", 10, "the custom state")
        assert handle.info == {"done": 5, "total": 10}  # Celery's res.info in a custom state
        release.set()
        assert handle.get(timeout=10) == "done"
    assert (handle.status, handle.info) == ("SUCCESS", "done")  # and the result once finished
    assert report.update_state(meta={"late": True}, task_id=handle.id) is False  # not running any more


def test_update_progress_is_bullmqs_progress_and_outlives_the_job(app: TaskPG, run_worker: Any) -> None:
    halfway, release = threading.Event(), threading.Event()

    @app.task(name="results.upload", bind=True)
    def upload(self: Any, parts: int) -> int:
        assert self.update_progress(50)
        assert self.update_state(state="UPLOADING", meta={"part": 1})
        halfway.set()
        release.wait(10)
        assert self.update_progress({"parts": parts, "done": parts})
        return parts

    handle = upload.delay(4)
    assert handle.progress is None
    with run_worker(app):
        assert halfway.wait(10)
        wait_for(lambda: handle.status == "UPLOADING", 10, "the custom state")
        assert (handle.progress, handle.info) == (50, {"part": 1})  # each keeps the other's
        release.set()
        assert handle.get(timeout=10) == 4
    assert handle.progress == {"parts": 4, "done": 4} and handle.info == 4
    assert upload.update_progress(99, task_id=handle.id) is False
    failed = app.AsyncResult(handle.id).record()
    assert failed is not None and failed["progress"]["progress"] == {"parts": 4, "done": 4}


def test_update_state_refuses_what_it_cannot_store(app: TaskPG) -> None:
    from taskpg import ConfigurationError, SerializationError

    @app.task(name="results.bad_state")
    def nothing() -> None:
        return None

    with pytest.raises(ConfigurationError, match="needs task_id"):
        nothing.update_state(meta={})
    some_id = nothing.delay().id
    with pytest.raises(ConfigurationError, match="a name of your own"):
        nothing.update_state(state="SUCCESS", task_id=some_id)
    with pytest.raises(SerializationError, match="not JSON"):
        nothing.update_state(meta={"when": object()}, task_id=some_id)


def test_forget_deletes_a_finished_job_and_keeps_an_unfinished_one(app: TaskPG, run_worker: Any) -> None:
    @app.task(name="results.forgettable")
    def forgettable(n: int) -> int:
        return n

    done = forgettable.delay(1)
    with run_worker(app):
        assert done.get(timeout=10) == 1
    waiting = forgettable.delay(2)
    assert waiting.forget() is False and waiting.status == "PENDING" and waiting.record() is not None
    assert done.forget() is True
    assert (done.status, done.result, done.record()) == ("PENDING", None, None)
    assert done.forget() is False and app.AsyncResult("not-a-job").forget() is False
