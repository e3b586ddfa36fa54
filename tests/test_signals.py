"""docs/signals.md: Celery's signals with their arguments, and middleware around every run, in every pool."""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pytest
from support.example_runner import run_example
from support.processes import stop_cleanly, taskpg_command, taskpg_env, wait_watching_workers
from support.rows import state_counts

from taskpg import Retry, Task, TaskPG, signals
from taskpg.beat import Beat
from taskpg.job import new_job_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg


class Recorder:
    """Connects one receiver to each given signal and keeps what each was sent."""

    def __init__(self, *names: str, sender: Any = None) -> None:
        self.sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._connected = [(getattr(signals, name), self._receiver(name)) for name in names]
        self.sender = sender
        for sig, receiver in self._connected:
            sig.connect(receiver, sender=sender)

    def _receiver(self, name: str) -> Any:
        def receive(signal: Any = None, sender: Any = None, **named: Any) -> None:
            with self._lock:
                self.sent[name].append({"sender": sender, **named})

        return receive

    def close(self) -> None:
        for sig, receiver in self._connected:
            assert sig.disconnect(receiver, sender=self.sender)


@pytest.fixture
def recorder() -> Iterator[Any]:
    made: list[Recorder] = []

    def make(*names: str, sender: Any = None) -> Recorder:
        made.append(Recorder(*names, sender=sender))
        return made[-1]

    yield make
    for one in made:
        one.close()


EXECUTION = ("task_prerun", "task_postrun", "task_success", "task_failure", "task_retry", "task_unknown")
PROCESS = ("worker_init", "worker_ready", "worker_shutdown")


def test_execution_and_worker_signals_fire_with_celerys_arguments(
    app: TaskPG, run_worker: Any, recorder: Any, db: psycopg.Connection
) -> None:
    @app.task(name="sig.ok")
    def ok(x: int) -> int:
        return x + 1

    @app.task(name="sig.flaky", bind=True)
    def flaky(self: Any) -> str:
        if self.request.attempt == 1:
            raise Retry(countdown=0, exc=ConnectionError("first try"))
        return "second"

    @app.task(name="sig.broken", max_retries=0)
    def broken() -> None:
        raise ValueError("broken for good")

    seen = recorder(*EXECUTION, *PROCESS)
    done = ok.delay(41), flaky.delay(), broken.delay()
    unknown_id = new_job_id()
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, args, kwargs, state) '
        "VALUES (%s, 'sig.nobody', 'default', '[]', '{}', 'available')",
        (unknown_id,),
    )
    with run_worker(app) as worker:
        for handle in done:
            handle.get(timeout=15, propagate=False)
        app.AsyncResult(unknown_id).get(timeout=15, propagate=False)
    assert (
        [s["sender"] for s in seen.sent["worker_init"]] == [worker] == [s["sender"] for s in seen.sent["worker_ready"]]
    )
    assert [s["sender"] for s in seen.sent["worker_shutdown"]] == [worker]

    prerun = {(s["task"].name, s["task_id"]) for s in seen.sent["task_prerun"]}
    assert prerun == {("sig.ok", done[0].id), ("sig.flaky", done[1].id), ("sig.broken", done[2].id)}
    first = next(s for s in seen.sent["task_prerun"] if s["task_id"] == done[0].id)
    assert (first["sender"], first["args"], first["kwargs"]) == (ok, [41], {})

    assert sorted(s["result"] for s in seen.sent["task_success"] if isinstance(s["result"], int)) == [42]
    assert {s["sender"].name for s in seen.sent["task_success"]} == {"sig.ok", "sig.flaky"}
    (retry,) = seen.sent["task_retry"]
    assert (retry["sender"], retry["request"].id, type(retry["reason"])) == (flaky, done[1].id, ConnectionError)
    assert "first try" in retry["einfo"].traceback
    (failure,) = seen.sent["task_failure"]
    assert (failure["sender"], failure["task_id"], str(failure["exception"])) == (broken, done[2].id, "broken for good")
    assert failure["traceback"] is failure["exception"].__traceback__ and failure["einfo"].type is ValueError
    postrun = sorted((s["task"].name, s["state"]) for s in seen.sent["task_postrun"])
    assert postrun == [
        ("sig.broken", "FAILURE"),
        ("sig.flaky", "RETRY"),
        ("sig.flaky", "SUCCESS"),
        ("sig.ok", "SUCCESS"),
    ]
    (unknown,) = seen.sent["task_unknown"]
    assert (unknown["sender"], unknown["name"], unknown["id"]) == (None, "sig.nobody", unknown_id)
    assert "no task of that name" in unknown["message"]


def test_sender_filters_by_task_or_task_name(app: TaskPG, run_worker: Any, recorder: Any) -> None:
    @app.task(name="sig.a")
    def a() -> str:
        return "a"

    @app.task(name="sig.b")
    def b() -> str:
        return "b"

    by_task, by_name = recorder("task_success", sender=a), recorder("task_success", sender="sig.b")
    with run_worker(app):
        a.delay().get(timeout=10)
        b.delay().get(timeout=10)
    assert [s["result"] for s in by_task.sent["task_success"]] == ["a"]
    assert [s["result"] for s in by_name.sent["task_success"]] == ["b"]


def test_a_receiver_that_raises_is_logged_and_breaks_nothing(
    app: TaskPG, run_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="sig.sturdy")
    def sturdy() -> str:
        return "fine"

    @signals.task_prerun.connect
    def bad_receiver(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    @signals.before_task_publish.connect
    def bad_publisher(**kwargs: Any) -> None:
        raise RuntimeError("publish receiver bug")

    try:
        with caplog.at_level(logging.ERROR, logger="taskpg.signals"), run_worker(app):
            assert sturdy.delay().get(timeout=10) == "fine"
    finally:
        signals.task_prerun.disconnect(bad_receiver)
        signals.before_task_publish.disconnect(bad_publisher)
    assert "receiver bug" in caplog.text and "publish receiver bug" in caplog.text
    assert "task_prerun: receiver" in caplog.text


def test_publish_signals_on_every_enqueue_path(buffered_app: TaskPG, recorder: Any) -> None:
    @buffered_app.task(name="sig.pub")
    def pub(x: int) -> None:
        return None

    @buffered_app.task(name="sig.unique", unique_key="{x}")
    def unique(x: int) -> None:
        return None

    seen = recorder("before_task_publish", "after_task_publish")
    one = pub.delay(1)
    buffered = pub.apply_async(args=(2,), via="buffer", countdown=5)
    many = pub.delay_many([(3,), (4,)])
    guarded = unique.delay_many([(5,)])
    ids = [one.id, buffered.id, *many, *guarded]
    before, after = seen.sent["before_task_publish"], seen.sent["after_task_publish"]
    assert [s["headers"]["id"] for s in before] == ids == [s["headers"]["id"] for s in after]
    assert [s["body"][0] for s in before] == [(1,), (2,), (3,), (4,), (5,)]
    assert {s["sender"] for s in before} == {"sig.pub", "sig.unique"}
    assert before[1]["headers"]["via"] == "buffer" and before[1]["headers"]["countdown"] == 5.0
    assert before[0]["routing_key"] == "default" and before[0]["headers"]["task"] == "sig.pub"


def test_task_revoked_fires_when_revoke_cancels_the_job(app: TaskPG, recorder: Any) -> None:
    @app.task(name="sig.later")
    def later() -> None:
        return None

    seen = recorder("task_revoked")
    handle = later.apply_async(countdown=3600)
    assert handle.revoke()
    assert not handle.revoke()  # already cancelled: no second signal
    (revoked,) = seen.sent["task_revoked"]
    assert (revoked["sender"], revoked["request"].id, revoked["terminated"], revoked["expired"]) == (
        later,
        handle.id,
        False,
        False,
    )


def test_beat_init_fires_when_beat_starts(app: TaskPG, recorder: Any) -> None:
    seen = recorder("beat_init")
    beat = Beat(app, flush_buffer=False)
    thread = threading.Thread(target=beat.run, daemon=True)
    thread.start()
    try:
        wait_watching_workers("beat_init", lambda: seen.sent["beat_init"], 10)
    finally:
        beat.stop()
        thread.join(10)
    assert [s["sender"] for s in seen.sent["beat_init"]] == [beat]


# -- middleware ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "async"])
def test_middleware_wraps_every_run_in_order(pg_dsn: str, migrated_schema: str, run_worker: Any, pool: str) -> None:
    order: list[str] = []

    def outer(call_next: Any, request: Any) -> Any:
        order.append(f"outer {request.task}")
        return ["outer", call_next(request)]

    def inner(call_next: Any, request: Any) -> Any:
        order.append("inner")
        request.kwargs = {**request.kwargs, "bonus": 1}  # a middleware may change what the task gets
        return ["inner", call_next(request)]

    async def outer_async(call_next: Any, request: Any) -> Any:
        order.append(f"outer_async {request.task}")
        try:
            return ["outer_async", await call_next(request)]
        except ValueError as exc:  # an async middleware sees what an async task raises
            return ["caught", str(exc)]

    app = TaskPG(pg_dsn, schema=migrated_schema, middleware=[outer, inner, outer_async])

    @app.task(name="mw.plain")
    def plain(x: int, bonus: int = 0) -> int:
        return x + bonus

    @app.task(name="mw.coro")
    async def coro(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 10

    with run_worker(app, pool=pool):
        assert plain.delay(1).get(timeout=10) == ["outer", ["inner", 2]]
        assert coro.delay(2).get(timeout=10) == ["outer_async", 20]  # only async middleware wraps async tasks
        assert coro.delay(-1).get(timeout=10) == ["caught", "negative"]
    assert order[:2] == ["outer mw.plain", "inner"] and order[2:] == ["outer_async mw.coro"] * 2
    app.close()


def test_middleware_and_worker_process_init_run_in_child_processes(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection, tmp_path: Any
) -> None:
    import hook_tasks

    db.execute(f'CREATE TABLE "{migrated_schema}".child_starts (pid int NOT NULL)')
    app = TaskPG(pg_dsn, schema=migrated_schema)
    doubled, tripled = (Task(app, t.fn, t.name, t.options) for t in (hook_tasks.double, hook_tasks.triple))
    first, second = doubled.delay(4), tripled.delay(5)
    argv = ("worker", "-A", "hook_tasks", "--pool", "processes", "-c", "2")
    env = taskpg_env(pg_dsn, migrated_schema)
    with open(tmp_path / "worker.log", "wb") as log, taskpg_command(*argv, env=env, stdout=log, stderr=log) as proc:
        wait_watching_workers("the jobs done", lambda: state_counts(db, migrated_schema) == {"succeeded": 2}, 60)
        stop_cleanly(proc)
    children = {pid for (pid,) in db.execute(f'SELECT pid FROM "{migrated_schema}".child_starts').fetchall()}
    assert len(children) == 2 and proc.pid not in children  # worker_process_init: once in each child
    for handle, result, task in ((first, 8, "hook_tasks.double"), (second, 15, "hook_tasks.triple")):
        stamped = handle.get(timeout=5)
        assert (stamped["result"], stamped["seen"]) == (result, task)
        assert stamped["pid"] in children  # the middleware ran in the child, around the task
    app.close()


def test_error_reporting_example(pg_dsn: str, schema: str) -> None:
    out = run_example("error_reporting.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    assert "order 2: charged 2" in out
    assert "ConnectionError('payment service down for order 3')" in out
    assert "reported: 2 failed attempt(s) of job" in out and ", 1 dead job(s)" in out
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    attempts = [(r["attempt"], r["task"], r["queue"]) for r in reports if "attempt" in r]
    assert attempts == [(1, "__main__.charge", "default"), (2, "__main__.charge", "default")]  # run as a script
    assert [r["job_id"] for r in reports if r.get("final")] == [reports[0]["job_id"]]


def test_an_attempt_failed_by_its_time_limit_sends_no_success_later(
    app: TaskPG, run_worker: Any, recorder: Any
) -> None:
    """In the threads pool a hard limit abandons the thread; when it finishes anyway, its outcome is discarded,
    and so are its signals: one attempt, one story."""
    release = threading.Event()
    ran_in: list[threading.Thread] = []

    @app.task(name="sig.slow", time_limit=0.3, max_retries=0)
    def slow() -> str:
        ran_in.append(threading.current_thread())
        release.wait(10)
        return "too late"

    seen = recorder("task_success", "task_failure", "task_postrun")
    with run_worker(app, time_limit_pool="threads"):
        handle = slow.delay()
        assert type(handle.get(timeout=10, propagate=False)).__name__ == "TimeLimitExceeded"
        release.set()  # the abandoned thread returns now, and ends (it was retired)
        ran_in[0].join(10)
        assert not ran_in[0].is_alive()
    assert seen.sent["task_success"] == []
    assert [s["state"] for s in seen.sent["task_postrun"]] == ["FAILURE"]
    assert [type(s["exception"]).__name__ for s in seen.sent["task_failure"]] == ["TimeLimitExceeded"]


def test_headers_a_publish_receiver_adds_travel_with_the_job(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    @app.task(name="sig.tenant", bind=True)
    def tenant(self: Any, n: int) -> str:
        return f"{self.request.headers.get('tenant')}:{n}"

    def stamp(headers: dict[str, Any], **kwargs: Any) -> None:
        headers["tenant"] = "acme"

    signals.before_task_publish.connect(stamp)
    try:
        one = tenant.delay(1)
        many = tenant.delay_many([(2,), (3,)])  # row by row while a publish receiver is connected
    finally:
        signals.before_task_publish.disconnect(stamp)
    plain = tenant.delay(4)  # no receiver: no headers
    rows = dict(db.execute(f'SELECT id::text, headers FROM "{app.schema}".jobs').fetchall())
    assert [rows[i] for i in (one.id, *many)] == [{"tenant": "acme"}] * 3 and rows[plain.id] is None
    with run_worker(app):
        assert [app.AsyncResult(i).get(timeout=10) for i in (one.id, *many, plain.id)] == [
            "acme:1",
            "acme:2",
            "acme:3",
            "None:4",
        ]


def test_headers_that_are_not_json_or_too_large_are_refused_at_enqueue(app: TaskPG) -> None:
    from taskpg import SerializationError

    @app.task(name="sig.headers")
    def noop() -> None:
        return None

    for bad in ({"when": object()}, {"blob": "x" * 9000}):

        def add(headers: dict[str, Any], bad: dict[str, Any] = bad, **kwargs: Any) -> None:
            headers.update(bad)

        signals.before_task_publish.connect(add)
        try:
            with pytest.raises(SerializationError, match="headers"):
                noop.delay()
        finally:
            signals.before_task_publish.disconnect(add)
